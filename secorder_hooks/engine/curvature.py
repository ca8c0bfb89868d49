r"""The curvature columns of a backward pass, fed to the sinks of the quantities that need them.

With :math:`L = c \sum_n \ell_n(f_n)` and loss-Hessian square-root columns :math:`s_k`
(:mod:`secorder_hooks.engine.loss_term`), a quantity of
:attr:`~secorder_hooks.quantities.Columns.EXACT` columns (the GGN diagonal
:math:`\operatorname{diag} G = \sum_n \sum_k w_{kn} (J_n^\top s_{kn})^{\odot 2}`, Kronecker
factors) gets the rule results of the columns backpropagated, all at once or in chunks,
from :math:`f` to the recorded module outputs (:mod:`secorder_hooks.engine.columns`);
:attr:`~secorder_hooks.quantities.Columns.SAMPLED` ones get sampled columns instead. For
:attr:`~secorder_hooks.quantities.Columns.HESSIAN` the engine adds the second-order term of
every curved operation between a parameter and :math:`f` (:mod:`secorder_hooks.engine.residuals`): one-hot columns from
the operation's input weighted by :math:`\phi''(a) \odot \partial L/\partial h`, or a
closed form when the operation directly follows a layer, plus the own-parameter terms of
modules handled by the generic rule.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from math import prod
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from secorder_hooks.engine.assemble import ColumnResults, Contributions, PassState
from secorder_hooks.engine.broadcast import replica_own_term
from secorder_hooks.engine.columns import backprop_columns, find_chain
from secorder_hooks.engine.curved_ops import DIAGONAL, node_name, second_derivative
from secorder_hooks.engine.graph import REENTRANT_CHECKPOINT_ADVICE, only_input, reentrant_checkpoint
from secorder_hooks.engine.loss_term import select_loss_term
from secorder_hooks.engine.mixing import mixes_examples
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.engine.residuals import CurvedSite, SiteKind, find_sites, records_below
from secorder_hooks.engine.rows import RowMap, row_map, split_columns
from secorder_hooks.engine.rowwise import block_columns, row_blocks
from secorder_hooks.engine.session import Session, active_sessions
from secorder_hooks.errors import ExtensionError, UnsupportedLossError, UnsupportedOperationError
from secorder_hooks.losses.base import LossTerm, SqrtColumns
from secorder_hooks.quantities import Columns, Quantity, Sink
from secorder_hooks.quantities.diagonals import Diagonals
from secorder_hooks.rules.base import LayerRule, rule_parameters, weighted_square_reduce
from secorder_hooks.rules.lookup import rule_for

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

__all__ = ["CurvaturePlan", "curvature_from_outputs", "column_pass", "SINGLE_COLUMN_BYTES"]

SINGLE_COLUMN_BYTES = 4 * 2**20
"""Recorded layer outputs per column (bytes, all calls) above which the square-root columns
are backpropagated one at a time unless ``column_chunk_size`` says otherwise.

Once a column's activations outgrow the caches, one vectorized backward of all ``V``
columns loses to a loop: its batched kernels copy and zero-fill ``V`` times larger
buffers. Measured on 2 cores (problem B of the benchmarks, a CNN with 6 MB of outputs
per column): all columns at once 10.9 x T0, one at a time 5.5 x T0; on the MLP problems
(under 0.5 MB) the vectorized backward wins, 3.8 against 7.7 x T0.
"""
_CURVATURE = frozenset({Columns.EXACT, Columns.SAMPLED, Columns.HESSIAN})
"""The column kinds this module feeds (the gradient is captured by the ordinary backward pass)."""


class CurvaturePlan:
    """The curvature work of one backward pass, planned while the graph is intact.

    Args:
        session: The active session.
        term: The loss term of the loss being differentiated.
        rows: The examples of the rows of the loss input.
        sites: Curved operations (only when a Hessian is requested).
    """

    def __init__(self, session: Session, term: LossTerm, rows: RowMap, sites: list[CurvedSite]) -> None:
        self.session = session
        self.term = term
        self.rows = rows
        self.sites = sites
        self.batch_size = rows.batch_size
        self._draws: dict[int, SqrtColumns] = {}
        """``id`` of a sampled quantity -> its columns of this pass (kept for a replay)."""

    @classmethod
    def build(cls, session: Session, loss: Tensor) -> CurvaturePlan:
        """Select the loss term and find the curved operations, raising before any work.

        Raises:
            UnsupportedLossError: The loss cannot be differentiated twice exactly, or a
                Monte-Carlo quantity is requested for a loss without a known likelihood.
            UnsupportedOperationError: The Hessian is requested through an operation
                whose second-order term is unknown.
        """
        curvature = [q for q in session.quantities if q.needs.columns in _CURVATURE]
        if reentrant_checkpoint(loss.grad_fn) is not None:
            names = ", ".join(type(q).__name__ for q in curvature)
            raise ExtensionError(
                f"loss.backward() inside extend(..., {names}) goes through activation checkpointing with "
                f"use_reentrant=True. {REENTRANT_CHECKPOINT_ADVICE} First-order quantities work with either."
            )
        term = select_loss_term(session, loss)
        rows = row_map(term.edge, term.shape, list(session.records))
        for q in curvature:
            undefined = q.needs.undefined_when_coupled
            if undefined is not None and rows.example_units is not None:
                raise UnsupportedLossError(
                    f"{type(q).__name__}: rows of the loss input {term.name} (shape {tuple(term.shape)}) depend on "
                    f"several examples, through {rows.coupling} (e.g. a reshape that merges rows of different "
                    f"examples), so the loss couples the examples and {undefined} undefined. Keep each row of the "
                    "loss input within one example, or request the total (DiagGGNExact, DiagHessian)."
                )
        if any(q.needs.columns is Columns.SAMPLED for q in curvature) and not _can_sample(term):
            term.sample_sqrt_hessian(1)  # raises UnsupportedLossError naming the loss
        sites: list[CurvedSite] = []
        if any(q.needs.columns is Columns.HESSIAN for q in curvature):
            self_curved = [
                (rec, frozenset(id(p) for p in rule_parameters(rule, rec.module).values()))
                for rec in session.records
                if _has_own_term(rule := rule_for(rec.module))
            ]
            sites = find_sites(term.edge.node, set(session.params), self_curved, session.param_names)
        for site in sites:
            _check_site_rows(site, rows)
        return cls(session, term, rows, sites)

    def register_capture_hooks(self) -> list[RemovableHandle]:
        r"""Hooks capturing :math:`\partial L / \partial h` at every curved operation."""
        return [site.node.register_prehook(site.capture) for site in self.sites]

    def feed(self, contributions: Contributions, sinks: Sequence[tuple[Quantity, Sink]]) -> None:
        """Feed every sink of a curvature quantity the columns it needs (and the Hessian terms).

        One pass of the exact columns serves all :attr:`~secorder_hooks.quantities.Columns.EXACT`
        and :attr:`~secorder_hooks.quantities.Columns.HESSIAN` sinks; each sampled quantity
        draws its own columns; the second-order terms of the curved operations are computed
        once (per example if any Hessian quantity keeps examples) and given to each Hessian sink.
        """
        records = _records(contributions)
        exact = [s for q, s in sinks if q.needs.columns in (Columns.EXACT, Columns.HESSIAN)]
        if exact:
            self._column_pass(contributions, records, self.term.sqrt_hessian(), exact)
        for q, sink in sinks:
            needs = q.needs
            if needs.columns is Columns.SAMPLED:
                draws = SqrtColumns(self.term.sample_sqrt_hessian(needs.samples, needs.generator))
                self._draws[id(q)] = draws
                self._column_pass(contributions, records, draws, [sink])
        hessian = [(q, s) for q, s in sinks if q.needs.columns is Columns.HESSIAN]
        if hessian:
            per_example = any(q.needs.per_example for q, _ in hessian)
            terms = Diagonals(per_example)
            self._residuals(contributions, records, terms, self.session.options.column_chunk_size)
            self._own_terms(contributions, terms)
            for q, sink in hessian:
                add_terms = getattr(sink, "add_terms", None)
                if add_terms is None:
                    raise ExtensionError(
                        f"{type(q).__name__} needs Columns.HESSIAN, but its sink ({type(sink).__name__}) has no "
                        "add_terms(terms, per_example) to receive the second-order terms of the curved operations."
                    )
                add_terms(terms.values, per_example)

    def replay(self, quantity: Quantity, contributions: Contributions, sink: Sink, chunk_size: int | None) -> None:
        """Feed ``sink`` the columns of ``quantity`` once more (the same draws for sampled columns)."""
        sqrt = self._draws[id(quantity)] if quantity.needs.columns is Columns.SAMPLED else self.term.sqrt_hessian()
        self._column_pass(contributions, _records(contributions), sqrt, [sink], chunk_size)

    def _column_pass(
        self,
        contributions: Contributions,
        records: list[CallRecord],
        sqrt: SqrtColumns,
        sinks: Sequence[Sink],
        chunk_size: int | None = None,
    ) -> None:
        chunk = _sqrt_chunk(records, self.session.options.column_chunk_size) if chunk_size is None else chunk_size
        blocks = _split(split_columns(sqrt, self.rows), chunk)
        column_pass(contributions, (self.term.edge,), blocks, records, *sinks, units=self.rows.example_units)

    def _residuals(self, contributions: Contributions, records: list[CallRecord], into: Diagonals, chunk: int | None):
        for site in self.sites:
            if site.grad is None:
                continue
            if site.kind is SiteKind.ELEMENTWISE:
                weights = second_derivative(site.node) * site.grad
                self._check_examples(site, weights)
                done = self._closed_forms(site, weights, contributions, into)
                targets = [rec for rec in records_below(site.sources, records) if rec not in done]
                columns = _one_hot(weights, chunk, product=False)
            elif site.kind is SiteKind.ROWWISE:
                if site.examples is not None and site.examples != self.batch_size:
                    raise UnsupportedOperationError(
                        f"the exact Hessian needs the second-order term of {type(site.node).__name__}, an instance "
                        f"normalization over {site.examples} examples, but the batch has {self.batch_size}. Keep "
                        "examples on dim 0, or use DiagGGNExact."
                    )
                blocks, to_input = row_blocks(site.node, site.grad)
                self._check_rows(site, blocks)
                targets = records_below(site.sources, records)
                if site.examples is not None:
                    self._check_instance_rows(site, targets)
                columns = (((to_input(cols),), w) for cols, w in block_columns(blocks, self.batch_size, chunk))
            elif site.kind is SiteKind.REUSED_WEIGHT:
                self._reused_weight(site, contributions, records, into)
                continue
            else:
                self._check_products(site)
                self._check_examples(site, site.grad)
                targets = records_below(site.sources, records)
                columns = _one_hot(site.grad, chunk, product=True)
            if targets:
                column_pass(contributions, site.sources, columns, targets, into)

    def _reused_weight(
        self, site: CurvedSite, contributions: Contributions, records: list[CallRecord], into: Diagonals
    ) -> None:
        r"""Cross term of :math:`h = \alpha\, a W^\top` whose activation ``a`` ``[N, I]`` depends on ``W`` too.

        :math:`\partial^2 (r^\top h) / \partial W_{pq}^2` has the cross term
        :math:`2 \alpha \sum_n r_{np}\, \partial a_{nq} / \partial W_{pq}` (for ``h = a W``,
        :math:`2 \alpha \sum_n r_{nq}\, \partial a_{np} / \partial W_{pq}`); the other terms are
        the sites below ``a``. One one-hot column per input coordinate ``q`` is
        backpropagated from ``a``; the per-example gradient of ``W`` of column ``q``, summed
        over all uses of ``W``, gives :math:`\partial a_{nq} / \partial W` (exact through any graph).
        """
        use = site.weight
        assert use is not None
        parts = contributions.by_param.get(use.param)
        targets = [rec for rec in records_below(site.sources, records) if any(rec is r for r, _ in parts or ())]
        if not parts or not targets:
            return
        r = site.grad  # [N, O]
        self._check_examples(site, r)
        n, k = r.shape[0], _factor(site.node).shape[1]
        eye = torch.eye(k, dtype=r.dtype, device=r.device)
        columns = eye[:, None, :].expand(k, n, k)  # [K(q), N, K]
        block = backprop_columns(site.sources, [columns], targets)

        def grad_outputs(rec: CallRecord) -> Tensor | tuple[Tensor, ...]:
            outs = block.get(id(rec)) or tuple(rec.zeros_like_output(i, (k,)) for i in range(len(rec.output_edges)))
            return outs[0] if len(outs) == 1 else outs

        g = ColumnResults(contributions, grad_outputs).per_example_grads(parts)  # [K(q), N, *W]
        # W [O, K]: d a_nq / d W_pq weighted by r_np; W [K, O]: d a_np / d W_pq weighted by r_nq
        pattern = "qnpq,np->npq" if use.transposed else "pnpq,nq->npq"
        term = 2 * use.alpha * torch.einsum(pattern, g, r)
        into.add(use.param, term if into.per_example else term.sum(0))

    def _closed_forms(
        self, site: CurvedSite, weights: Tensor, contributions: Contributions, into: Diagonals
    ) -> list[CallRecord]:
        r"""Closed forms of an elementwise site's term for the layers right below it.

        When the site's input :math:`a` is the output of a layer, its parameters get
        ``output_curvature(r)``. When that layer also has ``input_curvature`` and its input
        comes from the output :math:`z` of another layer through unary elementwise
        operations only (Jacobian :math:`\operatorname{diag}(d)`), the diagonal of the
        propagated matrix at :math:`z` is :math:`d^2 \odot` ``input_curvature(r)``, which is
        exact for that layer's parameters if each touches one output element.

        Returns:
            The records handled here (the column pass skips them).
        """
        done: list[CallRecord] = []
        weights_at, source = weights, site.sources[0]
        for depth in range(2):  # deeper layers see sums over paths: the columns are exact there
            record = _closed_form_record(source, contributions)
            if record is None:
                break
            rule = contributions.rules[record.module]
            if depth == 1 and not rule.touches_one_output(record.module, record.inputs):
                break
            terms = rule.output_curvature(record.module, record.inputs, weights_at, into.per_example)
            for name, value in terms.items():
                into.add(id(record.module.get_parameter(name)), value)
            done.append(record)
            below = rule.input_curvature(record.module, record.inputs, weights_at) if depth == 0 else None
            x = record.inputs[0] if record.inputs else None
            source = _diagonal_chain_end(x) if below is not None else None
            if source is None:
                break
            (d,) = torch.autograd.grad([x], [source], [torch.ones_like(x)], retain_graph=True)
            weights_at = d.square() * below
        return done

    def _own_terms(self, contributions: Contributions, into: Diagonals) -> None:
        for rec in _records(contributions):
            rule = contributions.rules[rec.module]
            if not _has_own_term(rule):
                continue
            grads = rec.grad_output()
            grads = tuple(g[0] for g in grads) if isinstance(grads, tuple) else grads[0]
            if rec.replica is not None:
                terms = replica_own_term(rule, rec, grads, into.per_example)
            else:
                terms = rule.own_hessian_term(rec.module, rec.inputs, grads, into.per_example)
            for name, value in terms.items():
                into.add(id(rec.module.get_parameter(name)), value)

    def _check_examples(self, site: CurvedSite, values: Tensor) -> None:
        if values.dim() == 0 or values.shape[0] != self.batch_size:
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second-order term of {type(site.node).__name__} on a tensor of shape "
                f"{tuple(values.shape)}, whose dim 0 is not the {self.batch_size} examples of the batch. Keep "
                "examples on dim 0 of activations, or use DiagGGNExact."
            )

    def _check_rows(self, site: CurvedSite, blocks: Tensor) -> None:
        if blocks.shape[0] % self.batch_size:
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second-order term of {type(site.node).__name__} over "
                f"{blocks.shape[0]} rows, which cannot be split among the {self.batch_size} examples (does it "
                "normalize over the batch?). Use DiagGGNExact."
            )

    @staticmethod
    def _check_instance_rows(site: CurvedSite, targets: list[CallRecord]) -> None:
        """Raise unless row ``n * C + c`` of an instance normalization depends on example ``n`` only."""
        a = site.node._saved_input
        layout = (site.examples, a.shape[1] // site.examples, *a.shape[2:])
        if mixes_examples(site.sources[0], a.shape, targets, layout):
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second-order term of {type(site.node).__name__}, a normalization with "
                "statistics over rows that do not each belong to one example (batch statistics, or a layout other "
                "than F.instance_norm's). Use DiagGGNExact, or secorder_hooks.hessian_diagonal outside extend()."
            )

    @staticmethod
    def _check_products(site: CurvedSite) -> None:
        node = site.node
        if not (node._saved_self.shape == node._saved_other.shape == site.grad.shape):
            raise UnsupportedOperationError(
                "the exact Hessian needs the second-order term of a broadcasting product whose factors both depend "
                f"on a parameter (shapes {tuple(node._saved_self.shape)} and {tuple(node._saved_other.shape)}). "
                "Expand the factors to a common shape first, or use DiagGGNExact."
            )


def column_pass(
    contributions: Contributions,
    sources: Sequence,
    blocks: Iterator[tuple[tuple[Tensor, ...], Tensor | None]],
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


def curvature_from_outputs(outputs: Tensor, term: LossTerm, quantity: Quantity) -> dict[int, Tensor]:
    """A curvature quantity of a loss of ``outputs`` computed inside ``extend()`` (the function API's GGN).

    Uses the records of the active session whose forward pass produced ``outputs``, and
    one vectorized backward of the quantity's columns (exact or sampled); the ordinary
    backward pass is not needed.

    Args:
        outputs: The model output the term is a function of.
        term: The loss term (its edge must be ``outputs``' or below it).
        quantity: A quantity of :attr:`~secorder_hooks.quantities.Columns.EXACT` or
            :attr:`~secorder_hooks.quantities.Columns.SAMPLED` columns whose sink needs no
            replay (:class:`~secorder_hooks.DiagGGNExact`, :class:`~secorder_hooks.DiagGGNMC`).

    Returns:
        Parameter id -> value, for every parameter the outputs depend on.

    Raises:
        LookupError: No active session recorded the forward pass of ``outputs``.
    """
    session = _active_session()
    records = records_below((term.edge,), [rec for rec in session.records if rec.output_edges]) if session else []
    if not records:
        raise LookupError("outputs were not computed inside an active secorder_hooks.extend() context.")
    contributions = Contributions.of(records)
    needs = quantity.needs
    if needs.columns is Columns.SAMPLED:
        sqrt = SqrtColumns(term.sample_sqrt_hessian(needs.samples, needs.generator))
    elif needs.columns is Columns.EXACT:
        sqrt = term.sqrt_hessian()
    else:
        raise ExtensionError(f"curvature_from_outputs supports exact or sampled columns, not {quantity!r}.")
    rows = row_map(term.edge, term.shape, records)
    sqrt = split_columns(sqrt, rows)
    sink = quantity.sink()
    session.records.paused = True
    try:
        chunk = _sqrt_chunk(records, session.options.column_chunk_size)
        column_pass(contributions, (term.edge,), _split(sqrt, chunk), records, sink, units=rows.example_units)
        context = PassState(contributions, session.params, session.param_names, rows.batch_size)
        return dict(sink.finish(context))
    finally:
        session.records.paused = False


def _active_session() -> Session | None:
    sessions = active_sessions()
    return sessions[-1] if sessions else None


def _factor(node) -> Tensor:
    """The activation factor ``a`` saved by a matrix-product node (``addmm``'s ``mat1``, ``mm``'s ``self``)."""
    return node._saved_mat1 if node_name(node) == "AddmmBackward0" else node._saved_self


def _records(contributions: Contributions) -> list[CallRecord]:
    seen: dict[int, CallRecord] = {}
    for parts in contributions.by_param.values():
        for rec, _ in parts:
            seen.setdefault(id(rec), rec)
    return list(seen.values())


def _has_own_term(rule: LayerRule) -> bool:
    return type(rule).own_hessian_term is not LayerRule.own_hessian_term


def _can_sample(term: LossTerm) -> bool:
    return type(term).sample_sqrt_hessian is not LossTerm.sample_sqrt_hessian


def _sqrt_chunk(records: Sequence[CallRecord], requested: int | None) -> int | None:
    """Columns per backward for the loss-Hessian square root: ``requested``, else by :data:`SINGLE_COLUMN_BYTES`."""
    if requested is not None:
        return requested
    per_column = sum(
        prod(shape) * dtype.itemsize
        for rec in records
        for shape, (dtype, _) in zip(rec.output_shapes, rec.output_kinds)
    )
    return 1 if per_column > SINGLE_COLUMN_BYTES else None


def _split(sqrt: SqrtColumns, size: int | None) -> Iterator[tuple[tuple[Tensor, ...], Tensor | None]]:
    """Chunks of at most ``size`` columns (all at once for ``None``)."""
    k = sqrt.columns.shape[0]
    step = k if size is None else size
    for start in range(0, k, step):
        weights = None if sqrt.weights is None else sqrt.weights[start : start + step]
        yield (sqrt.columns[start : start + step],), weights


def _one_hot(weights: Tensor, size: int | None, product: bool) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    r"""One-hot columns over the elements of one example, weighted by ``weights`` ``[N, *a]``.

    For ``product`` the columns are polarized for :math:`h = u \odot v`: pairs
    :math:`(e_j, e_j)` and :math:`(e_j, -e_j)` at the two factors, weighted by
    :math:`\pm r_j / 2`, whose weighted squares sum to :math:`2 r_j (J_u^\top e_j)(J_v^\top e_j)`.
    """
    n, shape = weights.shape[0], weights.shape[1:]
    flat = weights.reshape(n, -1).T  # [K, N]
    k = flat.shape[0]
    step = k if size is None else max(1, size // 2 if product else size)
    for start in range(0, k, step):
        stop = min(k, start + step)
        eye = torch.zeros(stop - start, k, dtype=weights.dtype, device=weights.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        cols = eye.unsqueeze(1).expand(-1, n, -1).reshape(stop - start, n, *shape)
        w = flat[start:stop]
        if product:
            yield (torch.cat([cols, cols]), torch.cat([cols, -cols])), torch.cat([w, -w]) / 2
        else:
            yield (cols,), w


def _check_site_rows(site: CurvedSite, rows: RowMap) -> None:
    """Raise if a curved operation between the model output and the loss input acts on rows that are not the examples.

    Its second-order term is weighted per row of its input, and the rules weight per example.
    """
    for source in site.sources:
        if not rows.examples_on_rows(source):
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second-order term of {type(site.node).__name__}, which acts on a tensor "
                "between the model output and the loss input whose rows are not known to be the examples in order "
                "(after a concatenation, slice, permutation or reshape of rows, or an operation the engine cannot "
                "trace). Apply the operation before rearranging rows (inside the model), or use DiagGGNExact."
            )


def _diagonal_chain_end(x: Tensor | None) -> GradientEdge | None:
    """The edge reached from ``x`` through unary elementwise nodes only (the last one before another node)."""
    if not isinstance(x, Tensor) or x.grad_fn is None:
        return None
    edge = get_gradient_edge(x)
    while node_name(edge.node) in DIAGONAL:
        index = only_input(edge.node)
        if index is None:
            return None
        edge = GradientEdge(*edge.node.next_functions[index])
    return edge


def _closed_form_record(source: GradientEdge, contributions: Contributions) -> CallRecord | None:
    """The record whose output is at ``source``, if its rule may use a closed form there.

    The closed form is exact only when every parameter of that module gets its gradient
    from this one call (no second call, no weight shared with another module).
    """
    for rec in _records(contributions):
        if source in rec.output_edges and len(rec.output_edges) == 1:
            if rec.replica is not None:  # the closed forms take the call's rows as the examples
                return None
            params = rule_parameters(contributions.rules[rec.module], rec.module).values()
            if all(len(contributions.by_param.get(id(p), ())) == 1 for p in params):
                return rec
            return None
    return None
