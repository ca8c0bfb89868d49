r"""Backpropagation of column blocks to the recorded module outputs.

Curvature quantities push ``V`` vectors ("columns") from one place of the graph, the
model output or the input of a curved operation, back to the outputs of the recorded
module calls below it. In general one vectorized backward through autograd
(:func:`~secorder_hooks.autodiff.vjp.batched_grad`) does this for all ``V`` columns at once.

When the graph below the source is a *chain*, a sequence of recorded layers whose rules
know their input Jacobian (:meth:`~secorder_hooks.rules.base.LayerRule.input_vjp`:
Linear, convolutions) joined by autograd nodes of one differentiable input each
(activations, pooling, reshapes, frozen layers), found once per column pass by
inspecting the graph (:func:`find_chain`), the columns are propagated without the
autograd engine: the rule's product for each layer (all columns in one batched
operation), the node itself for every other step (a backward function is linear in the
gradient it receives; for a unary elementwise node and several columns, its derivative
is computed once). This is exact because the walk checks that nothing else reaches the
recorded outputs from the source: every node on it has one input, and the layers' nodes
take only their recorded input and parameters. It saves the vectorization and engine
overhead: on a small MLP (problem A of the benchmarks) 1.26 against 0.93 ms for 9
columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.autograd.function import BackwardCFunction
from torch.autograd.graph import GradientEdge, Node

from secorder_hooks.autodiff.graph import leaf_variable, only_input
from secorder_hooks.autodiff.vjp import batched_grad
from secorder_hooks.engine.assemble import ColumnResults, Contributions
from secorder_hooks.engine.curved_ops import DIAGONAL, node_name
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.errors import ExtensionError
from secorder_hooks.quantities import Sink
from secorder_hooks.quantities.diagonals import Diagonals
from secorder_hooks.rules.base import LayerRule, weighted_square_reduce

__all__ = ["ColumnBlock", "Chain", "MAX_NODE_CALLS", "backprop_columns", "column_pass", "find_chain"]

ColumnBlock = dict[int, tuple[Tensor, ...]]
"""Record id -> the ``[V, N, *out_i]`` vectors at each differentiable output of the call."""

_CHAIN_ELEMENTWISE = DIAGONAL - {"ToCopyBackward0"}
"""Unary elementwise nodes whose derivative :func:`_through` may compute once (not dtype conversions)."""

MAX_NODE_CALLS = 16
"""Most columns a chain passes through a node that is not elementwise (one call per column);
with more, e.g. the one-hot columns of a Hessian term, autograd's batched kernels are used."""


@dataclass(frozen=True)
class _Step:
    """One step of a :class:`Chain` from the source down.

    Attributes:
        node: An autograd node to pass, or ``None`` at a record.
        index: Position of the node's one differentiable input.
        elementwise: The node is unary elementwise (its derivative serves all columns).
        record: The record whose output the columns reach here, for a record step.
        rule: The record's rule, whose ``input_vjp`` continues below it (``None`` at the last record).
    """

    node: Node | None = None
    index: int = 0
    elementwise: bool = False
    record: CallRecord | None = None
    rule: LayerRule | None = None


@dataclass(frozen=True)
class Chain:
    """How columns travel from one source through all the records without autograd (:func:`find_chain`)."""

    steps: tuple[_Step, ...]

    @property
    def calls_per_column(self) -> bool:
        """Whether some node is applied once per column (not elementwise)."""
        return any(step.node is not None and not step.elementwise for step in self.steps)


def backprop_columns(
    sources: Sequence[GradientEdge],
    columns: Sequence[Tensor],
    records: Sequence[CallRecord],
    chain: Chain | None = None,
) -> ColumnBlock:
    r"""Backpropagate columns from ``sources`` to the outputs of ``records``.

    Computes :math:`J_{\mathrm{out}}^\top s_v` for every column :math:`s_v`, where
    :math:`J` is the Jacobian of the source tensors with respect to each recorded output.

    Args:
        sources: Gradient edges of the tensors the columns live at.
        columns: One ``[V, *source.shape]`` block per source (the same ``V`` for all).
        records: The calls whose outputs receive the columns.
        chain: :func:`find_chain` of the same sources and records, if it found one.

    Returns:
        For each record, the ``[V, *out_i]`` vectors at every output (zeros where the
        sources do not reach it).
    """
    edges = [edge for rec in records for edge in rec.output_edges]
    if not edges:
        return {}
    if chain is not None:
        chained = _run_chain(chain, columns[0])
        if chained is not None:
            return chained
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


def column_pass(
    contributions: Contributions,
    sources: Sequence,
    blocks: Iterable[tuple[Sequence[Tensor], Tensor | None]],
    targets: Sequence[CallRecord],
    *sinks: Sink,
    units: Tensor | None = None,
) -> None:
    r"""Backpropagate column blocks and feed the rule results of each to every sink.

    Args:
        contributions: The contributing calls and their rules.
        sources: Gradient edges the columns start at.
        blocks: ``(columns per source [V, *source], weights [V, U] or None)`` chunks.
        targets: The records the columns can reach.
        sinks: Where to accumulate (:class:`~secorder_hooks.quantities.Sink`; only summed
            :class:`~secorder_hooks.quantities.diagonals.Diagonals` if ``units`` is given).
        units: ``[N]`` unit of each example: the per-example gradients are summed over
            each unit before squaring (:math:`\sum_v w_{vu} (\sum_{n \in u} g^{(v)}_n)^2`);
            ``None``: the units are the examples.
    """
    reached = {id(rec) for rec in targets}
    params = [(key, parts) for key, parts in contributions.by_param.items() if any(id(r) in reached for r, _ in parts)]
    chain = find_chain(sources, targets, contributions.rules)  # the graph is the same for every block
    for columns, weights in blocks:
        block = backprop_columns(sources, columns, targets, chain)
        v = columns[0].shape[0]

        def grad_outputs(rec: CallRecord, block=block, v=v) -> Tensor | tuple[Tensor, ...]:
            outs = block.get(id(rec)) or tuple(rec.zeros_like_output(i, (v,)) for i in range(len(rec.output_edges)))
            return outs[0] if len(outs) == 1 else outs

        results = ColumnResults(contributions, grad_outputs, weights)
        for sink in sinks:
            if units is None:
                sink.accumulate(results, params)
                continue
            if not isinstance(sink, Diagonals) or sink.per_example:
                raise ExtensionError("column_pass: rows coupling examples are supported for total diagonals only.")
            for key, parts in params:
                g = results.per_example_grads(parts)  # [V, N, *p]
                zeros = g.new_zeros(g.shape[0], int(units.max()) + 1, *g.shape[2:])
                summed = zeros.index_add_(1, units.to(g.device), g)
                sink.add(key, weighted_square_reduce(summed, weights, per_example=False))


def find_chain(
    sources: Sequence[GradientEdge], records: Sequence[CallRecord], rules: Mapping[nn.Module, LayerRule]
) -> Chain | None:
    """The chain from the only source through every record, if the graph is one; found by inspection alone.

    From the source down, nodes with one differentiable input each are passed until the
    output of a record (with one output); the record's node must take the record's first
    input directly and otherwise only parameter leaves, and its rule must have an
    ``input_vjp``; then the walk goes on from that input. Users' ``autograd.Function`` s are
    left to autograd. Edges are compared as ``(node, output_nr)`` pairs.
    """
    by_edge = {_pair(rec.output_edges[0]): rec for rec in records if len(rec.output_edges) == 1}
    if len(sources) != 1 or not records or len(by_edge) != len(records):
        return None
    edge = _pair(sources[0])
    steps: list[_Step] = []
    remaining = len(records)
    while True:
        while edge not in by_edge:  # the nodes between two records
            node = edge[0]
            index = only_input(node)
            if index is None or isinstance(node, BackwardCFunction):
                return None
            steps.append(_Step(node=node, index=index, elementwise=node_name(node) in _CHAIN_ELEMENTWISE))
            edge = node.next_functions[index]
        rec = by_edge[edge]
        remaining -= 1
        if remaining == 0:
            steps.append(_Step(record=rec))
            return Chain(tuple(steps))
        below = _layer_input_edge(rec)
        rule = rules[rec.module]
        if below is None or type(rule).input_vjp is LayerRule.input_vjp:
            return None
        steps.append(_Step(record=rec, rule=rule))
        edge = below


def _run_chain(chain: Chain, g: Tensor) -> ColumnBlock | None:
    """The columns ``g`` (``[V, *source]``) at every record of ``chain``; ``None`` where a step declines."""
    if len(g) > MAX_NODE_CALLS and chain.calls_per_column:
        return None
    result: ColumnBlock = {}
    with torch.no_grad():
        for step in chain.steps:
            if step.record is None:
                try:
                    g = _through(step, g)
                except (TypeError, RuntimeError):  # e.g. a node of several outputs wants a gradient for each
                    return None
                continue
            result[id(step.record)] = (g,)
            if step.rule is not None:
                g = step.rule.input_vjp(step.record.module, step.record.inputs, g)
                if g is None:
                    return None
    return result


def _through(step: _Step, g: Tensor) -> Tensor:
    """``[V, *in]`` vector-Jacobian products of the step's node.

    A backward function is linear in the gradient it receives: one call per column. For
    several columns through a unary elementwise node, its derivative (the node applied to
    ones) is computed once and multiplies all of them.
    """
    node = step.node
    if g.shape[0] > 1 and step.elementwise:
        return g * node(torch.ones_like(g[0]))
    grads = [node(column) for column in g]
    grads = [grad if isinstance(grad, Tensor) else grad[step.index] for grad in grads]
    return grads[0].unsqueeze(0) if len(grads) == 1 else torch.stack(grads)


def _pair(edge: GradientEdge) -> tuple[Node, int]:
    """``(node, output_nr)``, comparable with the entries of ``next_functions``."""
    return edge.node, edge.output_nr


def _layer_input_edge(rec: CallRecord) -> tuple[Node, int] | None:
    """The edge of the record's first input, if the output's node consumes it and otherwise only parameters."""
    x = rec.inputs[0] if rec.inputs else None
    if not isinstance(x, Tensor) or x.grad_fn is None:
        return None
    edge = (x.grad_fn, x.output_nr)  # the input as it is now: not if modified in place since
    consumed = [e for e in rec.output_edges[0].node.next_functions if e[0] is not None]
    if edge not in consumed or not all(e == edge or _is_parameter(e[0]) for e in consumed):
        return None
    return edge


def _is_parameter(node: Node) -> bool:
    """A leaf's ``AccumulateGrad``, or a transpose of one (how ``F.linear`` takes its weight)."""
    if leaf_variable(node) is not None:
        return True
    return node_name(node) == "TBackward0" and all(
        n is None or leaf_variable(n) is not None for n, _ in node.next_functions
    )
