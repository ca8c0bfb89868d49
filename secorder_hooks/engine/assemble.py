r"""Turning per-call rule results into per-parameter quantities.

A parameter may receive contributions from several calls (a module called in a loop)
or several modules (weights shared between modules). Per-example gradients are summed
over all of them *before* squaring; the rules' closed-form reductions are used only for
parameters with a single contribution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor, nn

from secorder_hooks.engine.accumulate import PassValues
from secorder_hooks.engine.broadcast import replica_rule_call
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.errors import ExtensionError
from secorder_hooks.quantities import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from secorder_hooks.rules.base import LayerRule, rule_for, squared_norms, weighted_square_reduce
from secorder_hooks.rules.generic import example_count, rule_parameters

if TYPE_CHECKING:
    from secorder_hooks.engine.session import Session

__all__ = ["Contributions", "ColumnResults", "assemble_first_order", "pass_examples"]


@dataclass
class Contributions:
    """Which recorded calls contribute to which trainable parameter.

    Attributes:
        by_param: Parameter id -> list of ``(record, name of the parameter in record.module)``.
        rules: The rule of every contributing module.
    """

    by_param: dict[int, list[tuple[CallRecord, str]]] = field(default_factory=dict)
    rules: dict[nn.Module, LayerRule] = field(default_factory=dict)

    @classmethod
    def collect(cls, session: Session) -> Contributions:
        """Group the calls reached by the last ordinary backward pass by parameter."""
        return cls.of([rec for rec in session.records if rec.reached], session.rules, session.owned)

    @classmethod
    def of(
        cls,
        records: Sequence[CallRecord],
        rules: dict[nn.Module, LayerRule] | None = None,
        owned: dict[nn.Module, dict[str, nn.Parameter]] | None = None,
    ) -> Contributions:
        """Group ``records`` by the trainable parameters of their modules.

        Args:
            records: The calls.
            rules: Known rule of each module (looked up where missing).
            owned: Known covered trainable parameters of each module (looked up where missing).
        """
        result = cls()
        rules, owned = rules or {}, owned or {}
        for rec in records:
            module = rec.module
            if module not in result.rules:
                result.rules[module] = rules[module] if module in rules else rule_for(module)
            params = owned[module] if module in owned else rule_parameters(result.rules[module], module)
            for name, p in params.items():
                result.by_param.setdefault(id(p), []).append((rec, name))
        return result


class ColumnResults:
    """Lazily computed, cached rule results for ``V`` vectors at each call's output.

    Args:
        contributions: The contributing calls.
        grad_outputs: ``record -> [V, N, *out]`` vectors at the output of the call.
        weights: Optional ``[V, N]`` weights of the vectors.
    """

    def __init__(
        self,
        contributions: Contributions,
        grad_outputs: Callable[[CallRecord], Tensor | tuple[Tensor, ...]],
        weights: Tensor | None = None,
    ) -> None:
        self.contributions = contributions
        self.grad_outputs = grad_outputs
        self.weights = weights
        self._cache: dict[tuple[int, str, bool], dict[str, Tensor]] = {}

    def _call(self, rec: CallRecord, method: str, per_example: bool = False) -> dict[str, Tensor]:
        key = (id(rec), method, per_example)
        if key not in self._cache:
            rule = self.contributions.rules[rec.module]
            g = self.grad_outputs(rec)
            if rec.replica is not None:  # one row shared by the examples (broadcast.py)
                out = replica_rule_call(rule, method, rec, g, self.weights, per_example)
            elif method == "per_example_grads":
                out = rule.per_example_grads(rec.module, rec.inputs, g)
            elif method == "squared_norms":
                out = rule.squared_norms(rec.module, rec.inputs, g)
            else:
                out = rule.weighted_squared_sum(rec.module, rec.inputs, g, self.weights, per_example)
            self._cache[key] = out
        return self._cache[key]

    def per_example_grads(self, parts: Sequence[tuple[CallRecord, str]]) -> Tensor:
        """``[V, N, *p]``: per-example gradients summed over all contributing calls."""
        total = None
        for rec, name in parts:
            g = self._call(rec, "per_example_grads")[name]
            if total is not None and total.shape != g.shape:
                raise ExtensionError(
                    f"module '{rec.name}' was called with different batch sizes in one forward pass "
                    f"({total.shape[1]} and {g.shape[1]}); per-example quantities need one batch size."
                )
            total = g if total is None else total + g
        assert total is not None
        return total

    def weighted_squared_sum(self, parts: Sequence[tuple[CallRecord, str]], per_example: bool) -> Tensor:
        r""":math:`\sum_v w_{vn} (g^{(v)}_n)^2`, summed over ``n`` unless ``per_example``."""
        if len(parts) == 1:
            rec, name = parts[0]
            return self._call(rec, "weighted_squared_sum", per_example)[name]
        return weighted_square_reduce(self.per_example_grads(parts), self.weights, per_example)

    def squared_norms(self, parts: Sequence[tuple[CallRecord, str]]) -> Tensor:
        """``[V, N]`` squared norm of each per-example gradient."""
        if len(parts) == 1:
            rec, name = parts[0]
            return self._call(rec, "squared_norms")[name]
        return squared_norms(self.per_example_grads(parts))


def assemble_first_order(session: Session, contributions: Contributions, into: PassValues) -> None:
    r"""Put the requested first-order quantities of this pass of every contributing parameter ``into``.

    ``Variance`` gets this pass's :math:`\sum_n g_n^2`; the accumulation computes it from
    the sums (:mod:`secorder_hooks.engine.accumulate`).

    Args:
        session: The active session (quantities, parameters).
        contributions: The contributing calls, with gradients captured in the backward pass.
        into: The values of this pass.
    """
    wanted = {type(q) for q in session.quantities}
    if not wanted & {BatchGrad, SumGradSquared, BatchL2Grad, Variance}:
        return
    results = ColumnResults(contributions, CallRecord.grad_output)
    for key, parts in contributions.by_param.items():
        if BatchGrad in wanted:
            into.put(key, BatchGrad, results.per_example_grads(parts)[0])
        if wanted & {SumGradSquared, Variance}:
            sum_sq = results.weighted_squared_sum(parts, per_example=False)
            for q in wanted & {SumGradSquared, Variance}:
                into.put(key, q, sum_sq)
        if BatchL2Grad in wanted:
            into.put(key, BatchL2Grad, results.squared_norms(parts)[0])


def pass_examples(contributions: Contributions) -> int:
    """Number of examples of the pass: read off the first contributing call (0 if none)."""
    for parts in contributions.by_param.values():
        rec = parts[0][0]
        return example_count(rec.module, rec.inputs, rec.output_shapes)
    return 0
