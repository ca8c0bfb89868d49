"""The public entry point of the hook engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from secorder_hooks.engine.options import EngineOptions
from secorder_hooks.engine.session import Session
from secorder_hooks.quantities import Quantity

__all__ = ["extend"]


@contextmanager
def extend(model: nn.Module, *quantities: Quantity, column_chunk_size: int | None = None) -> Iterator[Session]:
    r"""Compute ``quantities`` in every ``loss.backward()`` run inside the block.

    Inside the context, forward passes of ``model`` are recorded and a plain
    ``loss.backward()`` computes ``.grad`` as usual and, for every trainable parameter
    ``p`` of ``model``, each requested quantity under its attribute name (e.g.
    ``p.grad_batch``). With :math:`L = c \sum_n \ell_n(f_n)` the loss as computed, the
    quantities are scaled as in :mod:`secorder_hooks.quantities` (BackPACK's scaling).

    On exit, even when an exception escapes the block, every hook and recorded tensor is
    removed from the model; the computed attributes stay.

    Example:
        >>> import torch
        >>> from secorder_hooks import extend, BatchGrad
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
        >>> with extend(model, BatchGrad()):
        ...     torch.nn.functional.cross_entropy(model(x), y).backward()
        >>> model.weight.grad_batch.shape
        torch.Size([4, 2, 3])
        >>> torch.allclose(model.weight.grad_batch.sum(0), model.weight.grad)
        True

    Args:
        model: The model. Examples are indexed by dim 0 of its inputs.
        *quantities: Instances of the classes in :mod:`secorder_hooks.quantities`.
        column_chunk_size: Bound on the number of curvature columns backpropagated at
            once (see :class:`~secorder_hooks.engine.options.EngineOptions`).

    Yields:
        The session; its state is internal.

    Raises:
        ExtensionError: The model has no trainable parameters, or is used in a way the
            engine cannot make exact (the message says which and what to do).
    """
    session = Session(model, quantities, EngineOptions(column_chunk_size=column_chunk_size))
    session.open()
    try:
        yield session
    finally:
        session.close()
