"""The public entry point of the hook engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from secorder_hooks.engine.mode import EngineMode
from secorder_hooks.engine.options import EngineOptions
from secorder_hooks.engine.session import Session
from secorder_hooks.engine.sync import SyncOption, ddp_of, sync_group
from secorder_hooks.quantities import Quantity

__all__ = ["extend"]


@contextmanager
def extend(
    model: nn.Module,
    *quantities: Quantity,
    column_chunk_size: int | None = None,
    accumulate: bool = True,
    sync: SyncOption = None,
) -> Iterator[Session]:
    r"""Compute ``quantities`` in every ``loss.backward()`` run inside the block.

    Inside the context, forward passes of ``model`` are recorded and a plain
    ``loss.backward()`` computes ``.grad`` as usual and, for every trainable parameter
    ``p`` of ``model``, each requested quantity under its attribute name (e.g.
    ``p.grad_batch``). With :math:`L = c \sum_n \ell_n(f_n)` the loss as computed, the
    quantities are scaled as in :mod:`secorder_hooks.quantities` (BackPACK's scaling).

    Like ``.grad``, the quantities accumulate over backward passes (micro-batches) until
    ``.grad`` is reset by ``zero_grad()``: ``k`` passes give the quantities of one batch of
    their concatenated examples (sums add up, per-example ones are concatenated along
    dim 0; see :doc:`/conventions`).

    On exit, even when an exception escapes the block, every hook and recorded tensor is
    removed from the model; the computed attributes stay until the next backward pass
    inside ``extend()`` or :func:`~secorder_hooks.clear_quantities`. A backward pass
    outside the context changes ``.grad`` only.

    Under data-parallel training (a ``torch.nn.parallel.DistributedDataParallel`` model,
    or ``sync`` given) every process holds, after each backward pass, what one process
    would compute on the concatenated batch of all processes (:doc:`/distributed`): summed
    quantities are all-reduced with the weights that make the reduction factor :math:`c`
    the global one (:math:`1/D` for a mean over all :math:`D` terms of the global batch),
    per-example quantities keep this process's rows, reweighted alike. ``.grad`` stays
    what DDP makes of it: the average over processes of their gradients.

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
        accumulate: Accumulate over backward passes as ``.grad`` does (default); with
            ``False`` each backward pass overwrites the quantities with its own.
        sync: ``None`` (default): synchronize across processes if ``model`` is a
            ``DistributedDataParallel``, over its process group; ``True``: synchronize over
            its group, or the default group for any other model; ``False``: never (each
            process keeps the quantities of its shard); a ``torch.distributed``
            process group: synchronize over it. Synchronizing needs the loss to be one
            recognized loss function's result, possibly times a constant.

    Yields:
        The session; its state is internal.

    Raises:
        ExtensionError: The model has no trainable parameters, another ``extend()``
            context is active, or the model is used in a way the engine cannot make exact
            (the message says which and what to do), or ``sync=True`` without an
            initialized ``torch.distributed``. In a backward pass: ``.grad`` holds
            gradients that no backward pass inside ``extend()`` computed, so accumulated
            quantities could not match it (call ``zero_grad()`` first).
    """
    options = EngineOptions(column_chunk_size=column_chunk_size, accumulate=accumulate)
    session = Session(model, quantities, options, ddp_of(model), sync_group(model, sync))
    session.open()
    try:
        # The mode refers to the session, not the reverse: the session is freed by reference counting on
        # exit and a training loop leaves no work for the garbage collector, whose full collections cost
        # about 0.1 ms per step on small models.
        with EngineMode(session):
            yield session
    finally:
        session.close()
