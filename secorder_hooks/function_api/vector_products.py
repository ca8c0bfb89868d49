r"""The exact autograd paths of the Fisher functions: batched vector-Jacobian products.

Both functions below backpropagate batches of vectors from a tensor :math:`f` of the
graph to the parameters with one vectorized ``torch.autograd.grad`` per chunk
(:func:`~secorder_hooks.autodiff.vjp.batched_grad`), so they need no knowledge of the layers in between
(no layer rule: this is the "generic" backend of :mod:`secorder_hooks.function_api.backend`).

* :func:`ggn_diagonal_from_columns`: every loss-Hessian square-root column restricted to
  one row of :math:`f` is one vector :math:`u`; :math:`\sum_u w_u (J^\top u)^2` is the GGN
  diagonal (rows of one example never share a vector, so the sum is exact).
* :func:`per_example_gradients`: the loss gradient at the model output restricted to
  example :math:`n` gives :math:`c \nabla \ell_n`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from secorder_hooks.autodiff.vjp import batched_grad

__all__ = ["ggn_diagonal_from_columns", "per_example_gradients", "row_vectors"]

_CHUNK_BUDGET = 2**23
"""Bound on the elements of one chunk of vectors and of its results."""


def row_vectors(columns: Tensor, start: int, stop: int) -> Tensor:
    """Vectors ``start..stop`` of the row-restricted columns.

    Args:
        columns: ``[K, R, *f]``; vector ``j`` is column ``j // R`` restricted to row ``j % R``.
        start: First vector.
        stop: One past the last vector.

    Returns:
        ``[stop - start, R, *f]``, zero outside the vector's row.
    """
    k, r = columns.shape[0], columns.shape[1]
    flat = columns.reshape(k, r, -1)
    j = torch.arange(start, stop, device=columns.device)
    out = columns.new_zeros(stop - start, r, flat.shape[-1])
    out[torch.arange(stop - start, device=columns.device), j % r] = flat[j // r, j % r]
    return out.reshape(stop - start, *columns.shape[1:])


def _chunk(total: int, per_vector: int, chunk_size: int | None) -> int:
    return max(1, min(total, chunk_size or _CHUNK_BUDGET // max(per_vector, 1)))


def _vjp(
    f: Tensor | GradientEdge, params: Sequence[Tensor], vectors: Tensor, create_graph: bool
) -> Sequence[Tensor | None]:
    return batched_grad([f], params, [vectors], create_graph)


def ggn_diagonal_from_columns(
    f: Tensor | GradientEdge,
    params: Sequence[Tensor],
    columns: Tensor,
    weights: Tensor | None,
    create_graph: bool = False,
    chunk_size: int | None = None,
) -> list[Tensor | None]:
    r""":math:`\sum_{k,r} w_{kr} (J^\top s_{kr})^2` for every parameter.

    Args:
        f: The tensor (or its gradient edge) the columns live at, ``[R, *f]``.
        params: Parameters reached from ``f`` (those that require grad).
        columns: ``[K, R, *f]`` loss-Hessian square-root columns.
        weights: ``[K, R]`` signs/weights of the columns, or ``None``.
        create_graph: Keep the result differentiable.
        chunk_size: Vectors per batched backward (default: bounded by memory).

    Returns:
        Per parameter, the diagonal (``p.shape``), or ``None`` where ``f`` does not depend on it.
    """
    k, r = columns.shape[0], columns.shape[1]
    total = k * r
    size = _chunk(total, columns[0].numel() + sum(p.numel() for p in params), chunk_size)
    flat_w = None if weights is None else weights.reshape(total)
    result: list[Tensor | None] = [None] * len(params)
    for start in range(0, total, size):
        stop = min(total, start + size)
        grads = _vjp(f, params, row_vectors(columns, start, stop), create_graph)
        for i, g in enumerate(grads):
            if g is None:
                continue
            sq = g**2
            term = sq.sum(0) if flat_w is None else torch.einsum("b,b...->...", flat_w[start:stop].to(sq.dtype), sq)
            result[i] = term if result[i] is None else result[i] + term
    return result


def per_example_gradients(
    outputs: Tensor,
    loss: Tensor,
    params: Sequence[Tensor],
    create_graph: bool = False,
    chunk_size: int | None = None,
) -> Iterator[tuple[int, Sequence[Tensor | None]]]:
    r"""Chunks of per-example gradients :math:`c \nabla_\theta \ell_n` (``[B, *p]`` each).

    Args:
        outputs: Model output ``[N, *f]`` (dim 0 indexes the examples).
        loss: :math:`L = c \sum_n \ell_n(f_n)`, computed from ``outputs``.
        params: Parameters that require grad.
        create_graph: Keep the results differentiable.
        chunk_size: Examples per batched backward (default: bounded by memory).

    Yields:
        ``(start, grads)``: the first example of the chunk and one ``[B, *p]`` tensor (or
        ``None``) per parameter.
    """
    (g_out,) = torch.autograd.grad(loss, outputs, retain_graph=True, create_graph=create_graph)
    n = outputs.shape[0]
    size = _chunk(n, outputs.numel() + sum(p.numel() for p in params), chunk_size)
    for start in range(0, n, size):
        stop = min(n, start + size)
        yield start, _vjp(outputs, params, row_vectors(g_out.unsqueeze(0), start, stop), create_graph)
