r"""Exact diagonals of Hessians: of any scalar closure, and of a model's loss.

:func:`hessian_diagonal` knows nothing about models: it forms the gradient with a
graph and multiplies the Hessian with batches of unit vectors, vectorized by
``torch.func.vmap`` over ``torch.autograd.grad`` and chunked to bound memory.
:func:`model_hessian_diagonal` uses the hook engine (:class:`~secorder_hooks.DiagHessian`,
one backward pass) and falls back to :func:`hessian_diagonal` where the engine declines.
Both are thin public functions over ``secorder_hooks.function_api.hessian``.

Scale (see :doc:`/conventions`): the diagonal of the Hessian of the loss as computed,
:math:`L = c \sum_n \ell_n(f_n)`, so a ``"mean"`` loss gives ``1/N`` times the ``"sum"`` one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from secorder_hooks.engine.sync import SyncOption
from secorder_hooks.function_api.hessian import LossFn, hessian_diagonal_of_closure, hessian_diagonal_of_model
from secorder_hooks.function_api.validation import Inputs

__all__ = ["hessian_diagonal", "model_hessian_diagonal"]


def hessian_diagonal(
    func: Callable[[], Tensor],
    params: Sequence[Tensor],
    v: Sequence[Tensor] | None = None,
    create_graph: bool = False,
    strict: bool = False,
    *,
    chunk_size: int | None = None,
    progress: bool = False,
) -> list[Tensor]:
    r"""Exact diagonal of the Hessian of a scalar closure with respect to ``params``.

    For :math:`f = ` ``func()`` and parameters :math:`\theta_i` (each flattened), returns
    :math:`\operatorname{diag}(\partial^2 f / \partial \theta_i^2)` reshaped like
    :math:`\theta_i`; with ``v``, :math:`v_i \odot \operatorname{diag}(\cdot)`. Only the
    diagonal blocks :math:`H_{ii}` are touched: per parameter, the gradient is
    differentiated against chunks of unit vectors in one vectorized backward each.

    Example:
        >>> import torch
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> x = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> hessian_diagonal(lambda: x @ A @ x, [x])[0]
        tensor([4., 6.])

    Args:
        func: Closure without arguments returning a scalar (one-element tensor) that
            depends on ``params``.
        params: Leaf tensors, e.g. ``list(model.parameters())``.
        v: Optional tensors of the parameters' shapes multiplying the diagonals.
        create_graph: Make the result differentiable (e.g. for a penalty on curvature).
        strict: If ``False``, parameters that do not require grad or do not influence
            ``func()`` get zeros; if ``True`` they raise.
        chunk_size: Unit vectors per vectorized backward (default: bounded so that a
            chunk holds about :math:`2^{22}` elements).
        progress: Show a progress bar over the unit vectors (:mod:`tqdm` if installed).

    Returns:
        One tensor per parameter, of its shape.

    Raises:
        ValueError: ``params`` empty or not leaves, ``v`` of the wrong shapes,
            ``func()`` not a scalar, or (``strict``) a parameter without influence.
        TypeError: ``func()`` does not return a tensor.
    """
    return hessian_diagonal_of_closure(func, params, v, create_graph, strict, chunk_size, progress)


def model_hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    create_graph: bool = False,
    strict: bool = False,
    *,
    sync: SyncOption = None,
) -> list[Tensor]:
    r"""Exact diagonal of the Hessian of ``loss_fn(model(inputs), targets)`` for every parameter.

    With :math:`L = c \sum_n \ell_n(f_n)` the loss as computed, returns
    :math:`\operatorname{diag}(\partial^2 L / \partial \theta^2)` for each tensor of
    ``model.parameters()``. The hook engine computes it in one backward pass
    (:class:`~secorder_hooks.DiagHessian`); if the engine declines the model or the loss
    (an operation whose second derivative it cannot add, an unsupported layer), the result
    comes from :func:`hessian_diagonal` instead and a
    :class:`~secorder_hooks.FallbackWarning` is emitted. ``create_graph=True`` always uses
    :func:`hessian_diagonal`. The parameters' ``.grad`` are left as they were.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> diag = model_hessian_diagonal(model, torch.nn.MSELoss(reduction="sum"), x, y)
        >>> torch.allclose(diag[0], 2 * (x**2).sum(0, keepdim=True)) and torch.allclose(diag[1], torch.tensor([16.0]))
        True

    Args:
        model: The model; dim 0 of ``inputs`` indexes the examples.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: Model input ``[N, ...]``, a tuple of positional inputs, or a dict of keyword
            arguments (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``).
        targets: Targets ``[N, ...]``.
        create_graph: Make the result differentiable.
        strict: If ``True``, parameters that do not require grad or do not influence
            the loss raise instead of getting zeros.
        sync: Data-parallel training (:doc:`/distributed`): ``None`` (default) returns the
            diagonal of the global batch if ``model`` is a ``DistributedDataParallel``
            (over its process group), ``True`` or a process group for any model, ``False``
            that of this process's batch. Synchronizing needs ``loss_fn`` to return one
            standard loss (times a constant).

    Returns:
        Aligned with ``list(model.parameters())``, one tensor per parameter, of its shape.

    Raises:
        ValueError: Mismatched or empty batches, targets that do not fit a standard loss,
            a non-scalar loss, or (``strict``) a parameter without influence.
        ExtensionError: ``sync`` with ``create_graph=True`` or a non-standard loss.
    """
    return hessian_diagonal_of_model(model, loss_fn, inputs, targets, create_graph, strict, sync)
