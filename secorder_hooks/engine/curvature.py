r"""The curvature columns of a backward pass, fed to the sinks of the quantities that need them.

With :math:`L = c \sum_n \ell_n(f_n)` and loss-Hessian square-root columns :math:`s_k`
(:mod:`secorder_hooks.engine.loss_term`), a quantity of
:attr:`~secorder_hooks.quantities.Columns.EXACT` columns (the GGN diagonal
:math:`\operatorname{diag} G = \sum_n \sum_k w_{kn} (J_n^\top s_{kn})^{\odot 2}`, Kronecker
factors) gets the rule results of the columns backpropagated, all at once or in chunks,
from :math:`f` to the recorded module outputs (:mod:`secorder_hooks.engine.columns`);
:attr:`~secorder_hooks.quantities.Columns.SAMPLED` ones get sampled columns instead. For
:attr:`~secorder_hooks.quantities.Columns.HESSIAN` the engine adds the second-order terms of
the curved operations between a parameter and :math:`f` (:mod:`secorder_hooks.engine.hessian_terms`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from math import prod
from typing import TYPE_CHECKING

from torch import Tensor

from secorder_hooks.autodiff.graph import REENTRANT_CHECKPOINT_ADVICE, reentrant_checkpoint
from secorder_hooks.engine.assemble import Contributions, PassState
from secorder_hooks.engine.columns import column_pass
from secorder_hooks.engine.hessian_terms import HessianTerms
from secorder_hooks.engine.loss_term import select_loss_term
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.engine.residuals import records_below
from secorder_hooks.engine.rows import RowMap, row_map, split_columns
from secorder_hooks.engine.session import Session, active_sessions
from secorder_hooks.errors import ExtensionError, UnsupportedLossError
from secorder_hooks.losses.base import LossTerm, SqrtColumns
from secorder_hooks.quantities import Columns, Quantity, Sink
from secorder_hooks.quantities.diagonals import Diagonals

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
        hessian: The curved operations, when a Hessian quantity is requested.
    """

    def __init__(self, session: Session, term: LossTerm, rows: RowMap, hessian: HessianTerms | None) -> None:
        self.session = session
        self.term = term
        self.rows = rows
        self.hessian = hessian
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
        curvature = [q for q in session.quantities if session.needs_of(q).columns in _CURVATURE]
        if reentrant_checkpoint(loss.grad_fn) is not None:
            names = ", ".join(type(q).__name__ for q in curvature)
            raise ExtensionError(
                f"loss.backward() inside extend(..., {names}) goes through activation checkpointing with "
                f"use_reentrant=True. {REENTRANT_CHECKPOINT_ADVICE} First-order quantities work with either."
            )
        term = select_loss_term(session, loss)
        rows = row_map(term.edge, term.shape, list(session.records))
        for q in curvature:
            undefined = session.needs_of(q).undefined_when_coupled
            if undefined is not None and rows.example_units is not None:
                raise UnsupportedLossError(
                    f"{type(q).__name__}: rows of the loss input {term.name} (shape {tuple(term.shape)}) depend on "
                    f"several examples, through {rows.coupling} (e.g. a reshape that merges rows of different "
                    f"examples), so the loss couples the examples and {undefined} undefined. Keep each row of the "
                    "loss input within one example, or request the total (DiagGGNExact, DiagHessian)."
                )
        if any(session.needs_of(q).columns is Columns.SAMPLED for q in curvature) and not _can_sample(term):
            term.sample_sqrt_hessian(1)  # raises UnsupportedLossError naming the loss
        hessian = None
        if any(session.needs_of(q).columns is Columns.HESSIAN for q in curvature):
            hessian = HessianTerms.find(session, term.edge.node, rows)
        return cls(session, term, rows, hessian)

    def register_capture_hooks(self) -> list[RemovableHandle]:
        r"""Hooks capturing :math:`\partial L / \partial h` at every curved operation."""
        return self.hessian.capture() if self.hessian is not None else []

    def feed(self, contributions: Contributions, sinks: Sequence[tuple[Quantity, Sink]]) -> None:
        """Feed every sink of a curvature quantity the columns it needs (and the Hessian terms).

        One pass of the exact columns serves all :attr:`~secorder_hooks.quantities.Columns.EXACT`
        and :attr:`~secorder_hooks.quantities.Columns.HESSIAN` sinks; each sampled quantity
        draws its own columns; the second-order terms of the curved operations are computed
        once (per example if any Hessian quantity keeps examples) and given to each Hessian sink.
        """
        records = contributions.records()
        needs = self.session.needs_of
        exact = [s for q, s in sinks if needs(q).columns in (Columns.EXACT, Columns.HESSIAN)]
        if exact:
            self._column_pass(contributions, records, self.term.sqrt_hessian(), exact)
        for q, sink in sinks:
            if needs(q).columns is Columns.SAMPLED:
                draws = SqrtColumns(self.term.sample_sqrt_hessian(needs(q).samples, needs(q).generator))
                self._draws[id(q)] = draws
                self._column_pass(contributions, records, draws, [sink])
        hessian = [(q, s) for q, s in sinks if needs(q).columns is Columns.HESSIAN]
        if hessian:
            per_example = any(needs(q).per_example for q, _ in hessian)
            terms = Diagonals(per_example)
            assert self.hessian is not None, "Hessian quantities without the curved operations"
            self.hessian.compute(contributions, terms, self.session.options.column_chunk_size)
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
        sampled = self.session.needs_of(quantity).columns is Columns.SAMPLED
        sqrt = self._draws[id(quantity)] if sampled else self.term.sqrt_hessian()
        self._column_pass(contributions, contributions.records(), sqrt, [sink], chunk_size)

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
