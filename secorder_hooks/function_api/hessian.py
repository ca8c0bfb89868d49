r"""Exact Hessian diagonals: of any scalar closure (vectorized autograd), and of a model's loss.

:func:`hessian_diagonal_of_closure` knows nothing about models: it forms the gradient with a
graph and multiplies the Hessian with batches of unit vectors, vectorized by
``torch.func.vmap`` over ``torch.autograd.grad`` and chunked to bound memory.
:func:`hessian_diagonal_of_model` uses the hook engine (:class:`~secorder_hooks.DiagHessian`,
one backward pass) and the closure path where the engine declines
(:func:`~secorder_hooks.function_api.backend.engine_or_autograd`). The public functions are
:func:`secorder_hooks.core.hessian_diagonal.hessian_diagonal` and
:func:`secorder_hooks.core.hessian_diagonal.model_hessian_diagonal`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from secorder_hooks.autodiff.vjp import batched_grad
from secorder_hooks.engine.sync import SyncOption
from secorder_hooks.function_api.backend import engine_or_autograd
from secorder_hooks.function_api.engine_pass import run_engine
from secorder_hooks.function_api.progress import progress_bar
from secorder_hooks.function_api.sync import synchronized
from secorder_hooks.function_api.validation import (
    Inputs,
    ModelInputs,
    check_batch,
    check_params,
    check_scalar,
    check_vectors,
    zeros_like_all,
)
from secorder_hooks.losses.recognition import record_loss_calls
from secorder_hooks.quantities import DiagHessian

__all__ = ["LossFn", "hessian_diagonal_of_closure", "hessian_diagonal_of_model"]

LossFn = Callable[[Tensor, Tensor], Tensor]

_CHUNK_BUDGET = 2**22
"""Default bound on (unit vectors per chunk) x (elements of the parameter)."""


def hessian_diagonal_of_closure(
    func: Callable[[], Tensor],
    params: Sequence[Tensor],
    v: Sequence[Tensor] | None,
    create_graph: bool,
    strict: bool,
    chunk_size: int | None,
    progress: bool,
) -> list[Tensor]:
    """:func:`secorder_hooks.core.hessian_diagonal.hessian_diagonal` (see there)."""
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


def hessian_diagonal_of_model(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    create_graph: bool,
    strict: bool,
    sync: SyncOption,
) -> list[Tensor]:
    """:func:`secorder_hooks.core.hessian_diagonal.model_hessian_diagonal` (see there)."""

    def compute(model: nn.Module, loss_fn: LossFn) -> list[Tensor]:
        args = check_batch(model, inputs, targets)
        params = list(model.parameters())
        check_params(params, strict)
        return engine_or_autograd(
            "model_hessian_diagonal",
            None if create_graph else lambda: _engine(model, loss_fn, args, targets, params, strict),
            lambda: _autograd(model, loss_fn, args, targets, params, create_graph, strict),
            advice=" (vectorized Hessian-vector products), which is slower",
        )

    return synchronized("model_hessian_diagonal", model, loss_fn, sync, compute, create_graph)


def _autograd(
    model: nn.Module,
    loss_fn: LossFn,
    args: ModelInputs,
    targets: Tensor,
    params: list[Tensor],
    create_graph: bool,
    strict: bool,
) -> list[Tensor]:
    def closure() -> Tensor:
        # attention in its math kernel: the fused kernels of scaled_dot_product_attention have no double backward
        with record_loss_calls(), sdpa_kernel(SDPBackend.MATH):
            return loss_fn(args.call(model), targets)

    return hessian_diagonal_of_closure(closure, params, None, create_graph, strict, None, False)


def _engine(
    model: nn.Module, loss_fn: LossFn, args: ModelInputs, targets: Tensor, params: list[Tensor], strict: bool
) -> list[Tensor]:
    found = run_engine(model, loss_fn, args, targets, params, [DiagHessian()]).values[DiagHessian.attribute]
    return [_or_zeros(d, p, i, strict) for i, (d, p) in enumerate(zip(found, params))]


def _or_zeros(value: Tensor | None, p: Tensor, i: int, strict: bool) -> Tensor:
    if value is not None:
        return value
    if strict and p.requires_grad:
        raise ValueError(f"parameter {i} of the model does not influence the loss (strict=True).")
    return torch.zeros_like(p, memory_format=torch.contiguous_format).detach()
