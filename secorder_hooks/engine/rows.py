r"""Which examples each row of the loss input belongs to.

The loss term gives columns :math:`s_k` that factor the Hessian block of every *row*
:math:`r` of the tensor :math:`f` the loss is taken on (``[R, *rest]``). The layer rules
square per *example* :math:`n` (dim 0 of every recorded layer output). The squares are
exact when every row depends on at most one example and no column touches two rows of
one example; :func:`row_map` finds the example(s) of every row, :func:`split_columns`
rearranges the columns accordingly.

* Rows are the examples (``f`` is a layer output, or elementwise functions of one): no
  change, the fast path.
* Each row depends on one example (``torch.cat`` of two forward calls, ``o[:k]``,
  ``o[::2]``, a permutation, ``o.reshape(-1, C)`` of ``[N, 2C]`` or of ``[N, T, C]``, a
  time-major ``o.transpose(0, 1).reshape(-1, C)``): column :math:`k` is split into ``T``
  columns, the ``t``-th keeping the ``t``-th row of each example (``T`` the most rows of
  one example), and the weights follow the rows to their examples. Exact, per example too.
* Rows that depend on several examples (``o.reshape(N // 2, 2 * C)``, ``o.view(-1)[None]``)
  couple them: the examples linked by a row form a *unit*, and the columns are squared
  per unit (per-example gradients summed over the unit first). The total diagonal is
  exact; per-example quantities are undefined and raise.

The mapping is read off the autograd graph between the recorded layer outputs and
:math:`f` for the operations that move elements (views, slices, indexing,
concatenation, permutations, ...) or combine them elementwise; any other operation is
probed numerically: one vector-Jacobian product per row of :math:`f` with a random
vector on that row, down to the nearest recorded layer outputs, whose nonzero example
rows are those the row depends on (in the linearization the columns see, so a missed
dependence is an exact zero there too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from secorder_hooks.autodiff.graph import leaf_variable, only_input, saved_int
from secorder_hooks.autodiff.vjp import batched_grad
from secorder_hooks.engine.curved_ops import DIAGONAL, node_name
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.losses.base import SqrtColumns
from secorder_hooks.rules.layout import batch_layout_for

__all__ = ["RowMap", "row_map", "split_columns"]

_NONE, _MIXED = -1, -2
"""Example ids of elements that depend on no example / on several (not tracked which)."""

_RESHAPES = frozenset(
    {
        "ViewBackward0",
        "UnsafeViewBackward0",
        "ReshapeAliasBackward0",
        "UnsqueezeBackward0",
        "UnsqueezeBackward1",
        "SqueezeBackward0",
        "SqueezeBackward1",
        "SqueezeBackward2",
    }
)
_BINARY = frozenset(
    {
        "AddBackward0",
        "SubBackward0",
        "RsubBackward0",
        "MulBackward0",
        "DivBackward0",
        "WhereBackward0",
        "MaximumBackward0",
        "MinimumBackward0",
        "PowBackward1",
    }
)
_ALONG_DIM = frozenset({"SoftmaxBackward0", "LogSoftmaxBackward0"})
_REDUCTIONS = frozenset({"SumBackward1", "MeanBackward1"})
PROBE_ELEMENTS = 2**22
"""Most elements of one batch of row probes of the numerical fallback."""


@dataclass(frozen=True)
class RowMap:
    """The examples of the rows of the loss input ``f`` (``[R, *rest]``).

    Attributes:
        units: ``[R]`` unit of each row (``-1``: the row depends on no example); a unit is
            an example unless ``example_units`` is given.
        example_units: ``[N]`` unit of each example when rows couple examples, else ``None``.
        batch_size: ``N``, the examples along dim 0 of the recorded layer outputs.
        identity: Row ``r`` is example ``r`` (the columns need no change).
        coupling: Where rows couple examples, what does it (for error messages), else ``""``.
        walked: Example ids of the tensors between the recorded outputs and ``f`` read off the graph.
        unverified: Nodes between the recorded outputs and ``f`` whose element mapping was not read.
    """

    units: Tensor
    example_units: Tensor | None
    batch_size: int
    identity: bool
    coupling: str = ""
    walked: dict[tuple[Node, int], Tensor] = field(default_factory=dict)
    unverified: frozenset[Node] = frozenset()

    def examples_on_rows(self, edge: GradientEdge) -> bool:
        """Whether every element of row ``i`` of the tensor at ``edge`` depends on example ``i`` or on none."""
        ids = self.walked.get((edge.node, edge.output_nr))
        if ids is None:
            return edge.node not in self.unverified
        rows = torch.arange(ids.shape[0]).reshape(-1, *([1] * (ids.dim() - 1))) if ids.dim() else torch.tensor(0)
        return bool(((ids == rows) | (ids == _NONE)).all())

    @property
    def unit_count(self) -> int:
        """Units the columns are squared over (``N`` unless rows couple examples)."""
        if self.example_units is None:
            return self.batch_size
        return int(self.example_units.max()) + 1 if self.example_units.numel() else 0


def row_map(edge: GradientEdge | None, shape: torch.Size, records: Sequence[CallRecord]) -> RowMap:
    """The examples each row of the tensor at ``edge`` (shape ``shape``) depends on.

    Args:
        edge: Gradient edge of the loss input ``f``.
        shape: ``[R, *rest]``, its shape.
        records: The recorded calls (their outputs have the examples on dim 0).
    """
    bases = {(e.node, e.output_nr): (rec, i) for rec in records for i, e in enumerate(rec.output_edges)}
    rows = shape[0]
    if edge is None:
        return RowMap(torch.arange(rows), None, rows, identity=True)
    key = (edge.node, edge.output_nr)
    if key in bases and _example_axis(*bases[key]) == 0:  # the loss on a layer output: the fast path
        n = bases[key][0].output_shapes[bases[key][1]][0]
        return RowMap(torch.arange(rows), None, n, identity=n == rows)
    walk = _Walk(bases)
    unverified: frozenset[Node] = frozenset()
    try:
        ids = walk.ids(edge.node, edge.output_nr).reshape(rows, -1)
        coupling = "the operations between the model output and the loss input"
        n = walk.batch_size if walk.batch_size is not None else rows
    except _UntracedError as unknown:
        frontier, unverified = walk.frontier(edge.node)
        ids, n = _probe(edge, shape, frontier, [walk.base(e) for e in frontier])
        coupling = f"{unknown.args[0]} between the model output and the loss input"
    units, example_units = _units(ids, n)
    identity = example_units is None and rows == n and bool((units == torch.arange(rows)).all())
    coupling = coupling if example_units is not None else ""
    return RowMap(units, example_units, n, identity, coupling, walk.walked(), unverified)


def split_columns(sqrt: SqrtColumns, rows: RowMap) -> SqrtColumns:
    r"""Columns whose squares per unit factor each unit's Hessian block exactly.

    Column :math:`k` becomes ``T`` columns, the ``t``-th keeping the ``t``-th row of every
    unit (``T``: the most rows of one unit); rows of no example are dropped. The weights
    follow the rows to their units.

    Args:
        sqrt: ``[K, R, *rest]`` columns and ``[K, R]`` weights (or ``None``) over the rows.
        rows: The row map of the loss input.

    Returns:
        ``[K * T, R, *rest]`` columns and ``[K * T, U]`` weights over the units
        (``None`` if none given), ``U = N`` unless rows couple examples.
    """
    if rows.identity:
        return sqrt
    units, n_units = rows.units, rows.unit_count
    device = sqrt.columns.device
    occurrence = _occurrence(units)
    counted = units >= 0
    t = int(occurrence[counted].max()) + 1 if bool(counted.any()) else 1
    # row_of[t, u]: the t-th row of unit u (R, a padding row, where it has fewer)
    row_of = torch.full((t, n_units), units.shape[0], dtype=torch.long)
    row_of[occurrence[counted], units[counted]] = torch.arange(units.shape[0])[counted]
    cols = sqrt.columns
    masks = torch.zeros(t, units.shape[0], dtype=cols.dtype)
    masks[occurrence[counted], torch.arange(units.shape[0])[counted]] = 1
    if t > 1 or not bool(counted.all()):
        view = (t, 1, units.shape[0], *([1] * (cols.dim() - 2)))
        cols = (cols.unsqueeze(0) * masks.to(device).reshape(view)).flatten(0, 1)
    weights = None
    if sqrt.weights is not None:
        padded = torch.cat([sqrt.weights, sqrt.weights.new_zeros(sqrt.weights.shape[0], 1)], 1)  # [K, R + 1]
        weights = padded[:, row_of.to(device)].transpose(0, 1).flatten(0, 1)  # [T * K, U]
    return SqrtColumns(cols, weights)


class _UntracedError(Exception):
    """An operation whose element mapping :class:`_Walk` does not know (its name as the argument)."""


class _Walk:
    """Example ids of the elements of tensors in the graph above the recorded layer outputs.

    ``ids(node, nr)`` is a ``long`` tensor shaped like output ``nr`` of ``node``: the
    example each element depends on (``-1`` none, ``-2`` several), obtained by applying
    each operation's forward to the ids of its inputs.
    """

    def __init__(self, bases: dict[tuple[Node, int], tuple[CallRecord, int]]) -> None:
        self.bases = bases
        self.batch_size: int | None = None
        self._memo: dict[tuple[Node, int], Tensor] = {}

    def ids(self, node: Node, nr: int) -> Tensor:
        key = (node, nr)
        if key not in self._memo:
            self._memo[key] = self._compute(node, nr)
        return self._memo[key]

    def base(self, edge: GradientEdge) -> tuple[torch.Size, int]:
        """Shape and example axis of the recorded output at ``edge``."""
        rec, index = self.bases[(edge.node, edge.output_nr)]
        return rec.output_shapes[index], _example_axis(rec, index)

    def walked(self) -> dict[tuple[Node, int], Tensor]:
        """The ids computed so far, by ``(node, output_nr)``."""
        return dict(self._memo)

    def frontier(self, root: Node) -> tuple[list[GradientEdge], frozenset[Node]]:
        """The recorded layer outputs reached from ``root`` before any other, and the nodes passed."""
        found: dict[tuple[Node, int], None] = {}
        seen, stack = {root}, [root]
        while stack:
            node = stack.pop()
            for child, nr in node.next_functions:
                if child is None:
                    continue
                if (child, nr) in self.bases:
                    found[(child, nr)] = None
                elif child not in seen:
                    seen.add(child)
                    stack.append(child)
        return [GradientEdge(node, nr) for node, nr in found], frozenset(seen)

    def _child(self, node: Node, index: int) -> Tensor | None:
        child, nr = node.next_functions[index]
        return None if child is None else self.ids(child, nr)

    def _compute(self, node: Node, nr: int) -> Tensor:
        if (node, nr) in self.bases:
            size, axis = self.base(GradientEdge(node, nr))
            if axis >= len(size):  # no example axis: a function of all examples
                return torch.full(size, _MIXED, dtype=torch.long)
            self.batch_size = max(self.batch_size or 0, size[axis])
            return _along(size, axis)
        name = node_name(node)
        var = leaf_variable(node)
        if var is not None:
            return torch.full(var.shape, _NONE, dtype=torch.long)
        try:
            out = torch.Size(node._input_metadata[nr].shape)
        except (AttributeError, IndexError, RuntimeError):
            raise _UntracedError(name) from None
        if name in _RESHAPES:
            return self._only(node).reshape(out)
        if name == "ExpandBackward0":
            return self._only(node).expand(out)
        if name == "PermuteBackward0":
            return self._only(node).permute(*saved_int(node, "_saved_dims"))
        if name == "TransposeBackward0":
            return self._only(node).transpose(saved_int(node, "_saved_dim0"), saved_int(node, "_saved_dim1"))
        if name == "TBackward0":
            return self._only(node).t()
        if name == "SliceBackward0":
            x = self._only(node)
            bounds = (saved_int(node, "_saved_start"), saved_int(node, "_saved_end"), saved_int(node, "_saved_step"))
            return x[(slice(None),) * (saved_int(node, "_saved_dim") % x.dim()) + (slice(*bounds),)]
        if name == "SelectBackward0":
            return self._only(node).select(saved_int(node, "_saved_dim"), saved_int(node, "_saved_index"))
        if name == "IndexBackward0":
            x = self._only(node)
            return x[tuple(slice(None) if i is None else i.cpu() for i in node._saved_indices)]
        if name == "IndexSelectBackward0":
            return self._only(node).index_select(saved_int(node, "_saved_dim"), node._saved_index.cpu())
        if name in ("SplitBackward0", "SplitWithSizesBackward0"):
            sizes = saved_int(node, "_saved_split_size" if name == "SplitBackward0" else "_saved_split_sizes")
            return self._only(node).split(sizes, saved_int(node, "_saved_dim"))[nr]
        if name == "UnbindBackward0":
            return self._only(node).unbind(saved_int(node, "_saved_dim"))[nr]
        if name == "FlipBackward0":
            return self._only(node).flip(saved_int(node, "_saved_dims"))
        if name == "RollBackward0":
            return self._only(node).roll(saved_int(node, "_saved_shifts"), saved_int(node, "_saved_dims"))
        if name in ("CatBackward0", "StackBackward0"):
            return self._join(node, name, out)
        if name in DIAGONAL and only_input(node) is not None:
            x = self._only(node)
            if x.shape != out:
                raise _UntracedError(name)
            return x
        if name in _BINARY:
            parts = [
                torch.broadcast_to(x, out)
                for i in range(len(node.next_functions))
                if (x := self._child(node, i)) is not None
            ]
            result = parts[0]
            for part in parts[1:]:
                result = _merge(result, part)
            return result
        if name in _ALONG_DIM:
            x = self._only(node)
            return _reduce(x, (saved_int(node, "_saved_dim") % x.dim(),), keepdim=True).expand(x.shape)
        if name in _REDUCTIONS:
            x = self._only(node)
            dims = tuple(d % x.dim() for d in saved_int(node, "_saved_dim"))
            return _reduce(x, dims, keepdim=True).reshape(out)
        raise _UntracedError(name)

    def _only(self, node: Node) -> Tensor:
        index = only_input(node)
        if index is None:
            raise _UntracedError(node_name(node))
        x = self._child(node, index)
        assert x is not None
        return x

    def _join(self, node: Node, name: str, out: torch.Size) -> Tensor:
        dim = saved_int(node, "_saved_dim") % len(out)
        parts = [self._child(node, i) for i in range(len(node.next_functions))]
        known = [p for p in parts if p is not None]
        if name == "StackBackward0":
            return torch.stack([torch.full_like(known[0], _NONE) if p is None else p for p in parts], dim)
        missing = sum(p is None for p in parts)
        if missing > 1:
            raise _UntracedError(f"{name} of several constant tensors")
        if missing:
            rest = out[dim] - sum(p.shape[dim] for p in known)
            filler = torch.full((*out[:dim], rest, *out[dim + 1 :]), _NONE, dtype=torch.long)
            parts = [filler if p is None else p for p in parts]
        return torch.cat(parts, dim)


def _example_axis(rec: CallRecord, index: int) -> int:
    """The example axis of differentiable output ``index`` of a recorded call (its module's batch layout)."""
    return batch_layout_for(rec.module).output_axes(rec.module, rec.inputs)[index]


def _along(size: torch.Size, axis: int) -> Tensor:
    """Ids ``0 .. size[axis] - 1`` along ``axis``, shaped ``size``."""
    view = [1] * len(size)
    view[axis] = size[axis]
    return torch.arange(size[axis]).reshape(view).expand(size)


def _merge(a: Tensor, b: Tensor) -> Tensor:
    """Elementwise ids of a function of elements with ids ``a`` and ``b``."""
    clash = ((a >= 0) & (b >= 0) & (a != b)) | (a == _MIXED) | (b == _MIXED)
    return torch.where(a == _NONE, b, a).masked_fill(clash, _MIXED)


def _reduce(ids: Tensor, dims: tuple[int, ...], keepdim: bool) -> Tensor:
    """Ids of functions of all elements along ``dims``."""
    if ids.numel() == 0:
        return ids.sum(dims, keepdim=keepdim).fill_(_NONE)
    valid = ids >= 0
    lo = ids.masked_fill(~valid, torch.iinfo(torch.long).max).amin(dims, keepdim=keepdim)
    hi = ids.masked_fill(~valid, _NONE).amax(dims, keepdim=keepdim)
    mixed = (ids == _MIXED).any(dims, keepdim=keepdim) | ((hi >= 0) & (lo != hi))
    return torch.where(hi < 0, _NONE, lo).masked_fill(mixed, _MIXED)


def _probe(
    edge: GradientEdge, shape: torch.Size, frontier: list[GradientEdge], bases: list[tuple[torch.Size, int]]
) -> tuple[Tensor, int]:
    """``([R, N] ids, N)``: example ``n`` in column ``n`` of row ``r`` where row ``r`` depends on it, else ``-1``.

    One vector-Jacobian product per row, with a random vector on that row, down to the
    ``frontier`` (recorded layer outputs, with their shapes and example axes ``bases``).
    """
    rows, width = shape[0], prod(shape[1:])
    if not frontier:
        return torch.full((rows, 1), _NONE, dtype=torch.long), rows
    n = max((size[axis] for size, axis in bases if axis < len(size)), default=1)
    meta = edge.node._input_metadata[edge.output_nr]
    generator = torch.Generator(device=meta.device).manual_seed(0)
    probe = torch.randn(rows, width, dtype=meta.dtype, device=meta.device, generator=generator)
    depends = torch.zeros(rows, n, dtype=torch.bool)
    step = max(1, PROBE_ELEMENTS // max(1, rows * width))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        vectors = torch.zeros(stop - start, rows, width, dtype=meta.dtype, device=meta.device)
        vectors[torch.arange(stop - start), torch.arange(start, stop)] = probe[start:stop]
        grads = batched_grad([edge], frontier, [vectors.reshape(stop - start, *shape)])
        for g, (size, axis) in zip(grads, bases):
            if g is not None and axis >= len(size):  # no example axis: a function of all examples
                depends[start:stop] |= (g.reshape(stop - start, -1) != 0).any(-1, keepdim=True).cpu()
            elif g is not None:
                hit = (g.movedim(axis + 1, 1).reshape(stop - start, size[axis], -1) != 0).any(-1)
                depends[start:stop, : size[axis]] |= hit.cpu()
    return torch.where(depends, torch.arange(n), _NONE), n


def _units(ids: Tensor, n: int) -> tuple[Tensor, Tensor | None]:
    """``(units [R], example_units [N] or None)`` from ``[R, M]`` element ids of the rows.

    Units are the examples when no row depends on several; otherwise the connected
    groups of examples linked by rows (one group if some dependence is untracked).
    """
    row = _reduce(ids, (1,), keepdim=False)
    if not bool((row == _MIXED).any()):
        return row, None
    valid = ids >= 0
    if bool((ids == _MIXED).any()):
        labels = torch.zeros(n, dtype=torch.long)
    else:
        labels = torch.arange(n)
        safe = ids.clamp_min(0)
        while True:  # label propagation: every example takes the least label of the rows it is in
            lowest = labels[safe].masked_fill(~valid, n).amin(1, keepdim=True).expand_as(safe)
            new = labels.scatter_reduce(0, safe[valid], lowest[valid], "amin")
            new = new[new]
            if torch.equal(new, labels):
                break
            labels = new
    _, example_units = torch.unique(labels, return_inverse=True)
    first = ids.masked_fill(~valid, _NONE).amax(1)
    units = torch.where(first >= 0, example_units[first.clamp_min(0)], _NONE)
    return units, example_units


def _occurrence(units: Tensor) -> Tensor:
    """``[R]``: how many earlier rows belong to the same unit."""
    order = torch.argsort(units, stable=True)
    ordered = units[order]
    first = torch.searchsorted(ordered, ordered, right=False)
    occurrence = torch.empty_like(units)
    occurrence[order] = torch.arange(units.shape[0]) - first
    return occurrence
