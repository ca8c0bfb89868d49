r"""Exact diagonals of Hessians: of any scalar closure, and of a model's loss.

:func:`hessian_diagonal` knows nothing about models: it forms the gradient with a
graph and multiplies the Hessian with batches of unit vectors, vectorized by
``torch.func.vmap`` over ``torch.autograd.grad`` and chunked to bound memory.
:func:`model_hessian_diagonal` uses the hook engine (:class:`~secorder_hooks.DiagHessian`,
one backward pass) and falls back to :func:`hessian_diagonal` where the engine declines.

Scale (see :doc:`/conventions`): the diagonal of the Hessian of the loss as computed,
:math:`L = c \sum_n \ell_n(f_n)`, so a ``"mean"`` loss gives ``1/N`` times the ``"sum"`` one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from secorder_hooks.core._fallback import ENGINE_ERRORS, Backend, FallbackWarning, current_backend, engine_supports
from secorder_hooks.core._fallback import logger as _logger
from secorder_hooks.core._losses import record_loss_calls
from secorder_hooks.core._progress import progress_bar
from secorder_hooks.core._sync import synchronized
from secorder_hooks.core._validation import (
    Inputs,
    ModelInputs,
    check_batch,
    check_params,
    check_scalar,
    check_vectors,
    zeros_like_all,
)
from secorder_hooks.engine.sync import SyncOption
from secorder_hooks.engine.vjp import batched_grad

__all__ = ["hessian_diagonal", "model_hessian_diagonal"]

LossFn = Callable[[Tensor, Tensor], Tensor]

_CHUNK_BUDGET = 2**22
"""Default bound on (unit vectors per chunk) x (elements of the parameter)."""


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
    params = check_params(params, strict)
    vectors = check_vectors(v, params)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    value = check_scalar(func(), "func")
    result = zeros_like_all(params)
    active = [i for i, p in enumerate(params) if p.requires_grad]
    grads: Sequence[Tensor | None] = [None] * len(active)
    if active and value.requires_grad:
        grads = torch.autograd.grad(value, [params[i] for i in active], create_graph=True, allow_unused=True)
    bar = progress_bar(sum(params[i].numel() for i in active), progress, "hessian_diagonal")
    try:
        for i, g in zip(active, grads):
            if g is None:
                if strict:
                    raise ValueError(f"params[{i}] does not influence the result of func (strict=True).")
                bar.update(params[i].numel())
                continue
            if g.requires_grad:
                result[i] = _block_diagonal(g, params[i], create_graph, chunk_size, bar)
            else:
                bar.update(params[i].numel())  # the gradient is constant: zero Hessian block
    finally:
        bar.close()
    if vectors is not None:
        result = [vi * r for vi, r in zip(vectors, result)]
    return result


def _block_diagonal(g: Tensor, p: Tensor, create_graph: bool, chunk_size: int | None, bar) -> Tensor:
    r"""Diagonal of :math:`\partial g / \partial p` for ``g`` the gradient of a scalar with respect to ``p``."""
    n = p.numel()
    size = min(n, chunk_size or max(1, _CHUNK_BUDGET // n))
    pieces = []
    for start in range(0, n, size):
        b = min(size, n - start)
        rows = torch.arange(b, device=g.device)
        unit = torch.zeros(b, n, dtype=g.dtype, device=g.device)
        unit[rows, start + rows] = 1
        (hv,) = batched_grad([g], [p], [unit.reshape(b, *p.shape)], create_graph)
        if hv is None:  # g depends on other tensors only
            bar.update(n - start)
            return torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
        pieces.append(hv.reshape(b, n)[rows, start + rows])
        bar.update(b)
    return torch.cat(pieces).reshape(p.shape)


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

    def compute(model: nn.Module, loss_fn: LossFn) -> list[Tensor]:
        return _model_hessian_diagonal(model, loss_fn, inputs, targets, create_graph, strict)

    return synchronized("model_hessian_diagonal", model, loss_fn, sync, compute, create_graph)


def _model_hessian_diagonal(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor, create_graph: bool, strict: bool
) -> list[Tensor]:
    args = check_batch(model, inputs, targets)
    params = list(model.parameters())
    check_params(params, strict)
    if not create_graph and engine_supports(second_order=True):
        try:
            return _engine_hessian_diagonal(model, loss_fn, args, targets, params, strict)
        except ENGINE_ERRORS as err:
            if current_backend() is Backend.ENGINE:
                raise
            warnings.warn(
                FallbackWarning(
                    f"model_hessian_diagonal: the engine declined ({type(err).__name__}: {err}); "
                    "using the exact generic path (vectorized Hessian-vector products), which is slower."
                ),
                stacklevel=5,
            )
    _logger.debug("model_hessian_diagonal: generic path")

    def closure() -> Tensor:
        # attention in its math kernel: the fused kernels of scaled_dot_product_attention have no double backward
        with record_loss_calls(), sdpa_kernel(SDPBackend.MATH):
            return loss_fn(args.call(model), targets)

    return hessian_diagonal(closure, params, create_graph=create_graph, strict=strict)


def _engine_hessian_diagonal(
    model: nn.Module, loss_fn: LossFn, args: ModelInputs, targets: Tensor, params: list[Tensor], strict: bool
) -> list[Tensor]:
    from secorder_hooks.core._engine import run_engine
    from secorder_hooks.quantities import DiagHessian

    _logger.debug("model_hessian_diagonal: engine path")
    found = run_engine(model, loss_fn, args, targets, params, [DiagHessian()]).values[DiagHessian.attribute]
    return [_or_zeros(d, p, i, strict) for i, (d, p) in enumerate(zip(found, params))]


def _or_zeros(value: Tensor | None, p: Tensor, i: int, strict: bool) -> Tensor:
    if value is not None:
        return value
    if strict and p.requires_grad:
        raise ValueError(f"parameter {i} of the model does not influence the loss (strict=True).")
    return torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
