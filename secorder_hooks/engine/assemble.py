r"""Rule results per parameter: what the quantities' sinks read (:class:`~secorder_hooks.quantities.RuleResults`).

A parameter may receive contributions from several calls (a module called in a loop)
or several modules (weights shared between modules). Per-example gradients are summed
over all of them *before* squaring; the rules' closed-form reductions are used only for
parameters with a single contribution.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from secorder_hooks.engine.broadcast import replica_rule_call
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.errors import ExtensionError
from secorder_hooks.quantities import RuleMethod, Sink
from secorder_hooks.rules.base import LayerRule, implements, rule_parameters, squared_norms, weighted_square_reduce
from secorder_hooks.rules.layout import example_count
from secorder_hooks.rules.lookup import rule_for

__all__ = ["Contributions", "ColumnResults", "PassState", "pass_examples"]


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

    def records(self) -> list[CallRecord]:
        """The contributing calls, each once, in order of first contribution."""
        seen: dict[int, CallRecord] = {}
        for parts in self.by_param.values():
            for rec, _ in parts:
                seen.setdefault(id(rec), rec)
        return list(seen.values())


class ColumnResults:
    """Lazily computed, cached rule results for ``V`` vectors at each call's output.

    Implements :class:`~secorder_hooks.quantities.RuleResults`: the sinks of all quantities
    fed by one block share it, so a result two of them need is computed once.

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
        self._combined: dict[tuple[tuple, str, bool], Tensor] = {}
        """Results of parameters with several contributions, by their parts."""

    def implements(self, module: nn.Module, method: RuleMethod) -> bool:
        """Whether the rule of ``module`` implements ``method``."""
        return implements(self.contributions.rules[module], method)

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
        if len(parts) == 1:
            rec, name = parts[0]
            return self._call(rec, "per_example_grads")[name]
        key = (_parts_key(parts), "per_example_grads", False)
        if key not in self._combined:
            self._combined[key] = self._summed_grads(parts)
        return self._combined[key]

    def _summed_grads(self, parts: Sequence[tuple[CallRecord, str]]) -> Tensor:
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
        key = (_parts_key(parts), "weighted_squared_sum", per_example)
        if key not in self._combined:
            self._combined[key] = weighted_square_reduce(self.per_example_grads(parts), self.weights, per_example)
        return self._combined[key]

    def squared_norms(self, parts: Sequence[tuple[CallRecord, str]]) -> Tensor:
        """``[V, N]`` squared norm of each per-example gradient."""
        if len(parts) == 1:
            rec, name = parts[0]
            return self._call(rec, "squared_norms")[name]
        key = (_parts_key(parts), "squared_norms", False)
        if key not in self._combined:
            self._combined[key] = squared_norms(self.per_example_grads(parts))
        return self._combined[key]


@dataclass
class PassState:
    """The engine's :class:`~secorder_hooks.quantities.PassContext` for one quantity in one backward pass.

    Attributes:
        contributions: The contributing calls.
        params: Parameter id -> parameter.
        param_names: Parameter id -> name.
        batch_size: Number of examples of the pass.
        replayer: Feeds a sink the quantity's columns again (``None``: not available).
    """

    contributions: Contributions
    params: Mapping[int, Tensor]
    param_names: Mapping[int, str]
    batch_size: int
    replayer: Callable[[Sink, int | None], None] | None = None

    def replay(self, sink: Sink, chunk_size: int | None = None) -> None:
        """Feed ``sink`` the quantity's columns once more, at most ``chunk_size`` per block."""
        if self.replayer is None:
            raise ExtensionError("this computation cannot replay a quantity's columns (a second stage of its sink).")
        self.replayer(sink, chunk_size)

    def implements(self, module: nn.Module, method: RuleMethod) -> bool:
        """Whether the rule of ``module`` implements ``method``."""
        return implements(self.contributions.rules[module], method)


def _parts_key(parts: Sequence[tuple[CallRecord, str]]) -> tuple:
    return tuple((id(rec), name) for rec, name in parts)


def pass_examples(contributions: Contributions) -> int:
    """Number of examples of the pass: read off the first contributing call (0 if none)."""
    for parts in contributions.by_param.values():
        rec = parts[0][0]
        return example_count(rec.module, rec.inputs, rec.output_shapes)
    return 0
