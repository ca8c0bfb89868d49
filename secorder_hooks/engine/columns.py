r"""Vectorized backpropagation of column blocks to the recorded module outputs.

Curvature quantities push ``V`` vectors ("columns") from one place of the graph, the
model output or the input of a curved operation, back to the outputs of the recorded
module calls below it. One call of :func:`torch.autograd.grad` with
``is_grads_batched=True`` does this for all ``V`` columns at once; ``chunk_size`` bounds
the number of columns in flight, trading speed for peak memory.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from secorder_hooks.engine.graph import iter_nodes
from secorder_hooks.engine.records import CallRecord

__all__ = ["ColumnBlock", "backprop_columns", "chunks"]

ColumnBlock = dict[int, tuple[Tensor, ...]]
"""Record id -> the ``[V, N, *out_i]`` vectors at each differentiable output of the call."""


def chunks(columns: Tensor, weights: Tensor | None, size: int | None) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Split ``[K, ...]`` columns (and their ``[K, N]`` weights) into chunks of at most ``size``."""
    if size is None or columns.shape[0] <= size:
        yield columns, weights
        return
    for start in range(0, columns.shape[0], size):
        yield columns[start : start + size], None if weights is None else weights[start : start + size]


def backprop_columns(
    sources: Sequence[GradientEdge], columns: Sequence[Tensor], records: Sequence[CallRecord]
) -> ColumnBlock:
    r"""Backpropagate columns from ``sources`` to the outputs of ``records``.

    Computes :math:`J_{\mathrm{out}}^\top s_v` for every column :math:`s_v`, where
    :math:`J` is the Jacobian of the source tensors with respect to each recorded output.

    Args:
        sources: Gradient edges of the tensors the columns live at.
        columns: One ``[V, *source.shape]`` block per source (the same ``V`` for all).
        records: The calls whose outputs receive the columns.

    Returns:
        For each record, the ``[V, *out_i]`` vectors at every output (zeros where the
        sources do not reach it).
    """
    edges = [edge for rec in records for edge in rec.output_edges]
    if not edges:
        return {}
    v = columns[0].shape[0]
    grads = _vector_jacobian_products(list(sources), edges, list(columns))
    result: ColumnBlock = {}
    position = 0
    for rec in records:
        outputs = []
        for index in range(len(rec.output_edges)):
            g = grads[position]
            outputs.append(rec.zeros_like_output(index, (v,)) if g is None else g)
            position += 1
        result[id(rec)] = tuple(outputs)
    return result


_LOOPED: set[frozenset[str]] = set()
"""Graph signatures (sets of node types) on which batched backward fell back to a slow loop."""


def _vector_jacobian_products(
    sources: list[GradientEdge], edges: list[GradientEdge], columns: list[Tensor]
) -> list[Tensor | None]:
    """``[V, *edge]`` products for every edge: batched, or a loop over columns where faster.

    ``is_grads_batched`` vmaps the backward formulas; for operations without a batching
    rule (convolution and max-pooling backward, among others) PyTorch falls back to a
    per-column loop with extra copies, and a plain loop is faster. Such graphs are
    remembered by the set of their node types.
    """
    signature = frozenset(type(node).__name__ for edge in sources for node in iter_nodes(edge.node))
    if signature not in _LOOPED:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            grads = torch.autograd.grad(
                sources, edges, grad_outputs=columns, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        if not any("batching rule" in str(w.message) for w in caught):
            return list(grads)
        _LOOPED.add(signature)
        return list(grads)
    per_column = [
        torch.autograd.grad(sources, edges, grad_outputs=[c[i] for c in columns], retain_graph=True, allow_unused=True)
        for i in range(columns[0].shape[0])
    ]
    return [None if g[0] is None else torch.stack(g) for g in zip(*per_column)]
