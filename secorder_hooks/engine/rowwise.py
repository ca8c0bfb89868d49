r"""Second-order terms of row-wise curved operations: softmax, log-softmax, layer, group and instance norm.

Such an operation maps each row :math:`a_\rho \in \mathbb{R}^D` of its input (a slice
along the normalized or softmax dimensions) to a row of its output. With the gradient
:math:`r = \partial L/\partial h` captured in the backward pass, its Hessian term is block
diagonal over rows, with blocks

.. math::
    R_\rho = \nabla^2_{a_\rho} \big( r_\rho^\top \phi(a_\rho) \big) \in \mathbb{R}^{D\times D}.

:func:`row_blocks` returns these blocks ``[R, D, D]`` (rows example-major: example ``n``
owns rows ``n*T ... n*T+T-1``) and a function mapping ``[K, R, D]`` columns back to the
layout of :math:`a`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from einops import einsum, rearrange
from torch import Tensor
from torch.autograd.graph import Node
from torch.func import hessian, vmap

from secorder_hooks.autodiff.graph import saved_int
from secorder_hooks.engine.curved_ops import node_name

__all__ = ["ROWWISE", "row_blocks", "block_columns", "instance_rows"]

ToInput = Callable[[Tensor], Tensor]


def _dim(node: Node, ndim: int) -> int:
    return saved_int(node, "_saved_dim") % ndim


def _moved(t: Tensor, dim: int) -> tuple[Tensor, ToInput]:
    moved = t.movedim(dim, -1)
    shape = moved.shape

    def to_input(columns: Tensor) -> Tensor:
        return columns.reshape(columns.shape[0], *shape).movedim(-1, dim + 1)

    return moved.reshape(-1, shape[-1]), to_input


def _softmax(node: Node, grad: Tensor) -> tuple[Tensor, ToInput]:
    s, to_input = _moved(node._saved_result, _dim(node, grad.dim()))
    r, _ = _moved(grad, _dim(node, grad.dim()))
    su = s * (r - (r * s).sum(-1, keepdim=True))
    blocks = torch.diag_embed(su) - su.unsqueeze(-1) * s.unsqueeze(-2) - s.unsqueeze(-1) * su.unsqueeze(-2)
    return blocks, to_input


def _log_softmax(node: Node, grad: Tensor) -> tuple[Tensor, ToInput]:
    out, to_input = _moved(node._saved_result, _dim(node, grad.dim()))
    r, _ = _moved(grad, _dim(node, grad.dim()))
    s = out.exp()
    blocks = -r.sum(-1)[:, None, None] * (torch.diag_embed(s) - s.unsqueeze(-1) * s.unsqueeze(-2))
    return blocks, to_input


def _normalized(v: Tensor, r: Tensor, var_eps_offset: Tensor) -> Tensor:
    r""":math:`r^\top (v - \bar v) / \sqrt{\operatorname{var}(v) + \epsilon}` for one row."""
    centered = v - v.mean()
    return (r * centered).sum() * torch.rsqrt(centered.square().mean() + var_eps_offset)


def _norm_blocks(rows: Tensor, r: Tensor, rstd: Tensor) -> Tensor:
    # var + eps = rstd^-2 exactly as the forward computed it, so eps is recovered per row.
    eps = rstd.reshape(-1).double().pow(-2) - rows.double().var(-1, unbiased=False)
    return vmap(hessian(_normalized))(rows, r, eps.to(rows.dtype))


def _layer_norm(node: Node, grad: Tensor) -> tuple[Tensor, ToInput]:
    a = node._saved_input
    d = int(torch.Size(node._saved_normalized_shape).numel())
    r = grad if node._saved_weight is None else grad * node._saved_weight
    blocks = _norm_blocks(a.reshape(-1, d), r.reshape(-1, d), node._saved_result2)
    return blocks, lambda columns: columns.reshape(columns.shape[0], *a.shape)


def _group_norm(node: Node, grad: Tensor) -> tuple[Tensor, ToInput]:
    a, groups = node._saved_input, int(node._saved_group)
    r = grad
    if node._saved_weight is not None:
        r = grad * node._saved_weight.reshape(1, -1, *([1] * (grad.dim() - 2)))
    n = a.shape[0]
    blocks = _norm_blocks(a.reshape(n * groups, -1), r.reshape(n * groups, -1), node._saved_result2)
    return blocks, lambda columns: columns.reshape(columns.shape[0], *a.shape)


def _instance_norm(node: Node, grad: Tensor) -> tuple[Tensor, ToInput]:
    r"""Batch norm with batch statistics over a batch of one row: ``F.instance_norm``'s ``[1, N * C, *rest]``.

    Each channel ``n * C + c`` is a row (example ``n``, channel ``c``), normalized over ``rest``;
    :func:`instance_rows` checks that the rows are laid out so.
    """
    a = node._saved_input
    r = grad
    if node._saved_weight is not None:
        r = grad * node._saved_weight.reshape(1, -1, *([1] * (grad.dim() - 2)))
    blocks = _norm_blocks(a.reshape(a.shape[1], -1), r.reshape(a.shape[1], -1), node._saved_result2)
    return blocks, lambda columns: columns.reshape(columns.shape[0], *a.shape)


def instance_rows(node: Node) -> int | None:
    """For batch norm with batch statistics: the examples ``N`` of an instance-norm layout, else ``None``.

    The layout is that of ``F.instance_norm``: the input ``[1, N * C, *rest]`` is a view of
    ``[N, C, *rest]``, so channel ``n * C + c`` belongs to example ``n``.
    """
    a = node._saved_input
    source = node.next_functions[0][0]
    if a.dim() < 2 or a.shape[0] != 1 or source is None:
        return None
    if node_name(source) not in ("ViewBackward0", "UnsafeViewBackward0"):
        return None
    sizes = tuple(int(s) for s in getattr(source, "_saved_self_sym_sizes", ()))
    if len(sizes) != a.dim() or sizes[2:] != tuple(a.shape[2:]) or sizes[0] * sizes[1] != a.shape[1]:
        return None
    return sizes[0]


ROWWISE: dict[str, Callable[[Node, Tensor], tuple[Tensor, ToInput]]] = {
    "SoftmaxBackward0": _softmax,
    "LogSoftmaxBackward0": _log_softmax,
    "NativeLayerNormBackward0": _layer_norm,
    "NativeGroupNormBackward0": _group_norm,
    "NativeBatchNormBackward0": _instance_norm,  # only with batch statistics (see residuals.find_sites)
}
"""Row-wise curved nodes: type name -> ``(node, grad) -> (blocks [R, D, D], to_input)``."""


def row_blocks(node: Node, grad: Tensor) -> tuple[Tensor, ToInput]:
    """The Hessian blocks of a :data:`ROWWISE` node and the map of columns to its input."""
    return ROWWISE[node_name(node)](node, grad)


def block_columns(blocks: Tensor, batch_size: int, chunk_size: int | None) -> Iterator[tuple[Tensor, Tensor]]:
    r"""Signed square-root columns of block-diagonal per-example matrices, in chunks.

    Args:
        blocks: ``[R, D, D]`` symmetric blocks, ``R = N * T`` rows, example-major.
        batch_size: ``N``.
        chunk_size: Bound on the columns per chunk (at least ``D``); ``None`` for one chunk.

    Yields:
        ``[S * D, R, D]`` columns and ``[S * D, N]`` weights (eigenvalues) for ``S`` row
        slots: column ``(t, k)`` holds the ``k``-th eigenvector of row ``t`` of every
        example, so :math:`\sum_v w_{vn} s_{vn} s_{vn}^\top` over all chunks is example
        ``n``'s block-diagonal matrix.
    """
    eigenvalues, vectors = torch.linalg.eigh(blocks)  # [R, D], [R, D(e), D(k)]
    d, t = blocks.shape[-1], blocks.shape[0] // batch_size
    vectors = rearrange(vectors, "(n t) e k -> n t e k", t=t)
    eigenvalues = rearrange(eigenvalues, "(n t) k -> t k n", t=t)
    step = t if chunk_size is None else max(1, chunk_size // d)
    eye = torch.eye(t, dtype=blocks.dtype, device=blocks.device)
    for start in range(0, t, step):
        slots = eye[start : start + step]
        columns = einsum(slots, vectors, "s t, n t e k -> s k n t e")
        yield (
            rearrange(columns, "s k n t e -> (s k) (n t) e"),
            rearrange(eigenvalues[start : start + step], "s k n -> (s k) n"),
        )
