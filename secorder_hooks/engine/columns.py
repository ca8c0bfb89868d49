r"""Vectorized backpropagation of column blocks to the recorded module outputs.

Curvature quantities push ``V`` vectors ("columns") from one place of the graph, the
model output or the input of a curved operation, back to the outputs of the recorded
module calls below it. One vectorized backward
(:func:`~secorder_hooks.engine.vjp.batched_grad`) does this for all ``V`` columns at once.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.autograd.graph import GradientEdge

from secorder_hooks.engine.records import CallRecord
from secorder_hooks.engine.vjp import batched_grad

__all__ = ["ColumnBlock", "backprop_columns"]

ColumnBlock = dict[int, tuple[Tensor, ...]]
"""Record id -> the ``[V, N, *out_i]`` vectors at each differentiable output of the call."""


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
    grads = batched_grad(sources, edges, columns)
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
