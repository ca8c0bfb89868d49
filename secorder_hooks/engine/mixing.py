r"""Detection of operations that mix the examples of a batch (batch statistics).

Every quantity of the engine assumes that example ``n``'s model output depends on example
``n``'s activations only: :math:`\partial f_m / \partial h_n = 0` for :math:`m \ne n` at
every recorded layer output :math:`h`. A batch statistic between a parameter and the
model output (``F.batch_norm(x, None, None, training=True)``, ``x - x.mean(0)``, a softmax
over dim 0, ...) breaks this: per-example quantities are then undefined, and the GGN and
Hessian diagonals computed from per-example columns would be wrong.

Detection has two stages, so that ordinary models pay only a graph walk:

1. :func:`suspicious_nodes` walks the autograd graph of the loss and lists the nodes that
   *may* mix examples: reductions, normalizations and softmaxes whose dimensions include
   dim 0 (or all dims), cumulative ops along dim 0, and batch norm with batch statistics
   over a batch of several rows.
2. Only if one of them lies between a recorded layer output and the model output ``f``,
   :func:`mixes_examples` decides exactly: for every bit ``b`` of the example index, random
   vectors at ``f`` supported on the examples whose bit ``b`` is 1 (and on its complement)
   are backpropagated to the recorded layer outputs. Without mixing, their products vanish
   exactly on the other examples; any pair of examples ``m != n`` differs in some bit, so
   every dependence of one example's output on another example's activations is seen.
   A reduction over dim 0 of a tensor whose dim 0 is not the batch (time-major sequences)
   passes this test.

Inside a module handled by the generic rule (which differentiates the module one example
at a time), a suspicious node is refused directly: the rule cannot represent it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from secorder_hooks.autodiff.vjp import batched_grad
from secorder_hooks.engine.curved_ops import node_name
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.engine.rows import row_map
from secorder_hooks.errors import UnsupportedOperationError
from secorder_hooks.rules.layout import batch_layout_for

__all__ = ["BATCH_NORMS", "suspicious_nodes", "mixes_examples", "mixing_error", "LEAK_TOLERANCE"]

BATCH_NORMS = frozenset({"NativeBatchNormBackward0", "CudnnBatchNormBackward0", "MiopenBatchNormBackward0"})
"""Batch-norm nodes: with ``training`` they normalize with statistics over dims 0, 2, 3, ..."""

_FULL_REDUCTIONS = frozenset({"SumBackward0", "MeanBackward0", "ProdBackward0", "NormBackward0", "MaxBackward1"})
"""Reductions over every element (no ``dim`` saved)."""

_ALONG_DIMS = frozenset(
    {
        "SumBackward1",
        "MeanBackward1",
        "ProdBackward1",
        "NormBackward1",
        "LinalgVectorNormBackward0",
        "VarBackward0",
        "StdBackward0",
        "VarMeanBackward0",
        "StdMeanBackward0",
        "AmaxBackward0",
        "AminBackward0",
        "MaxBackward0",
        "MinBackward0",
        "MedianBackward1",
        "LogsumexpBackward0",
        "SoftmaxBackward0",
        "LogSoftmaxBackward0",
        "CumsumBackward0",
        "CumprodBackward0",
        "LogcumsumexpBackward0",
        "CummaxBackward0",
        "CumminBackward0",
        "SortBackward0",
        "TopkBackward0",
    }
)
"""Statistics along saved ``dim`` s: they mix examples when the dims include dim 0."""

_CANDIDATES = BATCH_NORMS | _FULL_REDUCTIONS | _ALONG_DIMS
_ACCUMULATE_GRAD = torch._C._functions.AccumulateGrad

LEAK_TOLERANCE = 1e-6
"""Relative size of a probe's products on the other examples above which examples count as mixed
(they vanish exactly without mixing; with a batch statistic over ``N`` examples they are of order ``1/N``)."""


def _ndim(node: Node) -> int | None:
    for attr in ("_saved_self_sym_sizes", "_saved_self_sizes"):
        sizes = getattr(node, attr, None)
        if sizes is not None:
            return len(sizes)
    for attr in ("_saved_self", "_saved_result", "_saved_input"):
        t = getattr(node, attr, None)
        if isinstance(t, Tensor):
            return t.dim()
    return None


def _covers_dim0(node: Node) -> bool:
    """Whether the node's saved ``dim`` (one or several, ``None`` for all) includes dim 0."""
    dims = node._saved_dim
    if dims is None:
        return True
    dims = dims if isinstance(dims, (tuple, list)) else (dims,)
    if len(dims) == 0:  # sum(dim=()) reduces over everything
        return True
    ndim: int | None = -1  # read only for a negative dim (the common dims are positive)
    for d in dims:
        d = int(d)
        if d >= 2**63:  # saved as unsigned
            d -= 2**64
        if d < 0 and ndim == -1:
            ndim = _ndim(node)
        if d == 0 or (d < 0 and (ndim is None or d % ndim == 0)):
            return True
    return False


def _batch_dim(node: Node) -> int:
    x = getattr(node, "_saved_input", None)
    return x.shape[0] if isinstance(x, Tensor) and x.dim() > 0 else 0


def describe(node: Node) -> str | None:
    """Why ``node`` may mix the examples of a batch, or ``None`` if it cannot."""
    name = node_name(node)
    if name in BATCH_NORMS:
        # a backend node that does not save the flag (cuDNN, MIOpen) is probed whenever its batch has rows
        if getattr(node, "_saved_training", name != "NativeBatchNormBackward0") and _batch_dim(node) > 1:
            return f"{name} (batch normalization with batch statistics, e.g. F.batch_norm(..., training=True))"
        return None
    if name in _FULL_REDUCTIONS:
        return f"{name} (a reduction over all elements, examples included)"
    if name in _ALONG_DIMS and hasattr(node, "_saved_dim") and _covers_dim0(node):
        return f"{name} (an operation along dim 0, the examples: a batch statistic)"
    return None


def suspicious_nodes(root: Node | None, stop: Node | None = None) -> dict[Node, str]:
    """The nodes reachable from ``root`` that may mix examples, with a description of each.

    Args:
        root: Where the walk starts (the loss's node).
        stop: A node whose own operation is not checked (the model output's, when the
            walk starts above it), though the walk continues below it.
    """
    found: dict[Node, str] = {}
    if root is None:
        return found
    seen, stack = {root}, [root]
    while stack:  # iter_nodes written out: this walk runs in every backward pass
        node = stack.pop()
        if node is not stop and type(node).__name__ in _CANDIDATES:  # the common case: one set lookup
            why = describe(node)
            if why is not None:
                found[node] = why
        for child, _ in node.next_functions:
            # parameters' AccumulateGrad nodes (a third of the graph of an MLP) are leaves and never mix
            if child is not None and type(child) is not _ACCUMULATE_GRAD and child not in seen:
                seen.add(child)
                stack.append(child)
    return found


def mixes_examples(
    edge: GradientEdge, shape: torch.Size, records: Sequence[CallRecord], layout: Sequence[int] | None = None
) -> bool:
    """Whether the tensor at ``edge`` (examples on dim 0) depends across examples on the records' outputs.

    Args:
        edge: Gradient edge of the probed tensor, e.g. the model output ``f``.
        shape: Its shape; which examples its rows belong to is read by :func:`~secorder_hooks.engine.rows.row_map`
            (rows that already couple examples, e.g. a reshape merging rows, are probed per group of examples).
        records: Calls whose outputs are probed (example axis from their batch layout).
        layout: A shape of the same size whose dim 0 holds the examples, if ``shape``'s does not
            (``[N, C, *rest]`` for instance norm's ``[1, N * C, *rest]``).
    """
    targets = [(rec, i) for rec in records for i in range(len(rec.output_edges))]
    if not targets:
        return False
    probed = torch.Size(layout) if layout is not None else shape
    if layout is not None:  # rows of the layout are the examples
        row_units, example_units, n, examples_n = torch.arange(probed[0]), None, probed[0], probed[0]
    else:
        rows = row_map(edge, shape, records)
        row_units, example_units, n, examples_n = rows.units, rows.example_units, rows.unit_count, rows.batch_size
    if n < 2:
        return False
    bits = max(1, math.ceil(math.log2(n)))
    units = torch.arange(n)
    inside = torch.stack([((units >> b) & 1) == side for b in range(bits) for side in (0, 1)])  # [2B, U]
    row_inside = inside[:, row_units.clamp_min(0)] & (row_units >= 0)  # [2B, R]
    if example_units is not None:
        inside = inside[:, example_units]  # [2B, N]
    dtype, device = records[0].output_kinds[0]
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(len(inside), *probed, generator=generator, dtype=torch.float64).to(dtype=dtype, device=device)
    mask = row_inside.to(device).reshape(len(inside), probed[0], *([1] * (len(probed) - 1)))
    columns = (values * mask).reshape(len(inside), *shape)
    grads = batched_grad([edge], [rec.output_edges[i] for rec, i in targets], [columns])
    for (rec, i), g in zip(targets, grads):
        if g is None:
            continue
        axis = batch_layout_for(rec.module).output_axes(rec.module, rec.inputs)[i] + 1
        if g.shape[axis] != examples_n:
            continue
        g = g.movedim(axis, 1).abs().flatten(2).amax(-1)  # [2B, N]
        scale = g.max()
        if scale > 0 and (g * ~inside.to(g.device)).max() > LEAK_TOLERANCE * scale:
            return True
    return False


def mixing_error(why: str, where: str) -> UnsupportedOperationError:
    """The error for an operation that mixes examples."""
    return UnsupportedOperationError(
        f"the operation {why} mixes the examples of the batch {where}: the output of one example depends on the "
        "others, so per-example quantities (BatchGrad, SumGradSquared, BatchL2Grad, Variance, the per-example "
        "curvature) are undefined, and the engine's GGN and Hessian diagonals, built from per-example terms, "
        "would be wrong. Normalize per example (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm in eval mode with "
        "running statistics); for the Hessian diagonal of the batch loss use secorder_hooks.hessian_diagonal "
        "(exact, by autograd) outside extend()."
    )
