"""The quantities of one backward pass: a sink per requested quantity, fed the vectors it needs.

The engine knows no quantity by name. For every quantity of the session it makes a
:class:`~secorder_hooks.quantities.Sink` (:meth:`~secorder_hooks.quantities.Quantity.sink`)
and feeds it by what the quantity declares (:attr:`~secorder_hooks.Quantity.needs`, asked once per ``extend()``):

* :attr:`~secorder_hooks.quantities.Columns.GRADIENT`: the rule results of the gradients
  captured in the ordinary backward pass, one block shared by all such sinks;
* exact, sampled and Hessian columns: :meth:`~secorder_hooks.engine.curvature.CurvaturePlan.feed`.

Then each sink gives its per-parameter values of this pass, which go into the
:class:`~secorder_hooks.engine.accumulate.PassValues` that the accumulation combines with
earlier passes and attaches.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

from torch import Tensor

from secorder_hooks.engine.accumulate import PassValues
from secorder_hooks.engine.assemble import ColumnResults, Contributions, PassState
from secorder_hooks.engine.curvature import CurvaturePlan
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.engine.session import Session
from secorder_hooks.quantities import Accumulation, Columns, Quantity, Sink

__all__ = ["compute_quantities"]

_ATTACHED_AS_IS = (Accumulation.SUM, Accumulation.CONCATENATE)
"""Accumulations whose first pass attaches the value itself (so two quantities must not share a tensor)."""


def compute_quantities(
    session: Session, contributions: Contributions, plan: CurvaturePlan | None, into: PassValues
) -> None:
    """Compute this pass's value of every requested quantity and put it ``into``.

    Args:
        session: The active session (its quantities, parameters).
        contributions: The contributing calls, with gradients captured in the backward pass.
        plan: The curvature work planned before the backward pass (``None`` if no quantity needs columns).
        into: The values of this pass.
    """
    sinks = [(q, q.sink()) for q in session.quantities]
    gradient = [sink for q, sink in sinks if session.needs_of(q).columns is Columns.GRADIENT]
    if gradient:
        _feed_gradient(contributions, gradient)
    curvature = [(q, sink) for q, sink in sinks if session.needs_of(q).columns is not Columns.GRADIENT]
    if curvature:
        assert plan is not None, "a curvature quantity without a curvature plan"
        plan.feed(contributions, curvature)
    batch_size = plan.batch_size if plan is not None else into.examples
    attached: dict[int, set[int]] = {}
    for q, sink in sinks:
        replayer = _replayer(session, q, contributions, plan)
        state = PassState(contributions, session.params, session.param_names, batch_size, replayer)
        for key, value in sink.finish(state).items():
            if q.accumulation in _ATTACHED_AS_IS and isinstance(value, Tensor):
                seen = attached.setdefault(key, set())
                if id(value) in seen:  # e.g. the GGN and a Hessian no curved operation reaches
                    value = value.clone()
                seen.add(id(value))
            into.put(key, type(q), value)


def _feed_gradient(contributions: Contributions, sinks: Sequence[Sink]) -> None:
    """One block: the gradient captured at every contributing call's output, for all parameters."""
    results = ColumnResults(contributions, CallRecord.grad_output)
    params = list(contributions.by_param.items())
    for sink in sinks:
        sink.accumulate(results, params)


def _replayer(session: Session, q: Quantity, contributions: Contributions, plan: CurvaturePlan | None):
    if session.needs_of(q).columns is Columns.GRADIENT:
        return lambda sink, chunk_size: _feed_gradient(contributions, [sink])
    assert plan is not None
    return partial(plan.replay, q, contributions)
