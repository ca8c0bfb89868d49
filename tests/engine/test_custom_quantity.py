"""Quantities defined outside the package run through the engine exactly (against torch.func, float64).

Each is one class here: what it needs (:class:`~secorder_hooks.quantities.Needs`) and its
sink. Nothing in ``secorder_hooks`` knows them, so a pass proves that the engine computes
quantities by what they declare, not by their class.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder_hooks as sh
from secorder_hooks.quantities import (
    Accumulation,
    BlockSums,
    Columns,
    Needs,
    Order,
    PassContext,
    RuleMethod,
    ShardScaling,
    Sink,
)
from tests.support import reference

_NORMS = frozenset({RuleMethod.SQUARED_NORMS})


def _weighted(norms: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return norms if weights is None else norms * weights


@dataclass(frozen=True)
class GradSecondMoment(sh.Quantity):
    r"""Per parameter tensor, :math:`\sum_n \|c \nabla_p \ell_n\|^2` (a scalar): first order."""

    attribute: ClassVar[str] = "grad_second_moment"
    order: ClassVar[Order] = Order.FIRST
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(2)

    @property
    def needs(self) -> Needs:
        return Needs(Columns.GRADIENT, rule_methods=_NORMS)

    def sink(self) -> Sink:
        return BlockSums(lambda results, parts: results.squared_norms(parts)[0].sum())


@dataclass(frozen=True)
class GGNTrace(sh.Quantity):
    """Trace of each parameter tensor's GGN block, from the exact columns."""

    attribute: ClassVar[str] = "ggn_trace"
    order: ClassVar[Order] = Order.SECOND
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)

    @property
    def needs(self) -> Needs:
        return Needs(Columns.EXACT, rule_methods=_NORMS)

    def sink(self) -> Sink:
        return BlockSums(lambda results, parts: _weighted(results.squared_norms(parts), results.weights).sum())


@dataclass(frozen=True)
class BatchGGNTrace(sh.Quantity):
    """``[N]``: example n's term of :class:`GGNTrace`, concatenated over passes."""

    attribute: ClassVar[str] = "ggn_trace_batch"
    order: ClassVar[Order] = Order.SECOND
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)

    @property
    def needs(self) -> Needs:
        undefined = "the per-example traces are"
        return Needs(Columns.EXACT, per_example=True, rule_methods=_NORMS, undefined_when_coupled=undefined)

    def sink(self) -> Sink:
        return BlockSums(lambda results, parts: _weighted(results.squared_norms(parts), results.weights).sum(0))


class _TraceWithTerms(BlockSums):
    """Weighted squared norms of the columns plus the traces of the engine's second-order terms."""

    def __init__(self) -> None:
        super().__init__(lambda results, parts: _weighted(results.squared_norms(parts), results.weights).sum())

    def add_terms(self, terms: dict[int, torch.Tensor], per_example: bool) -> None:
        for key, value in terms.items():
            self.values[key] = self.values[key] + value.sum() if key in self.values else value.sum()

    def finish(self, context: PassContext) -> dict[int, torch.Tensor]:
        return {key: self.values.get(key, torch.zeros(())) for key in context.contributions.by_param}


@dataclass(frozen=True)
class HessianTrace(sh.Quantity):
    """Trace of each parameter tensor's block of the exact Hessian."""

    attribute: ClassVar[str] = "hessian_trace"
    order: ClassVar[Order] = Order.SECOND
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)

    @property
    def needs(self) -> Needs:
        return Needs(Columns.HESSIAN, rule_methods=_NORMS)

    def sink(self) -> Sink:
        return _TraceWithTerms()


class SharedTwice(nn.Module):
    """A Linear layer called twice (its parameters get two contributions each), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.inner(torch.tanh(self.inner(x)))))


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "mlp": nn.Sequential(nn.Linear(5, 7), nn.Sigmoid(), nn.Linear(7, 3)).double(),
        "shared": SharedTwice().double(),
    }


def _data(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))


def _loss(kind: str):
    if kind == "ce":
        return lambda f, y: F.cross_entropy(f, y)
    return lambda f, y: F.mse_loss(f, F.one_hot(y, 3).double(), reduction="sum")


@pytest.mark.parametrize("loss", ["ce", "mse"])
@pytest.mark.parametrize("name", ["mlp", "shared"])
def test_custom_quantities_match_brute_force(name: str, loss: str) -> None:
    model, (x, y), loss_fn = _models()[name], _data(), _loss(loss)
    with sh.extend(model, GradSecondMoment(), GGNTrace(), BatchGGNTrace(), HessianTrace()):
        loss_fn(model(x), y).backward()
    grads = reference.per_example_grads(model, loss_fn, x, y)
    ggn = reference.ggn_diagonal(model, loss_fn, x, y, per_example=True)
    hessian = reference.hessian_diagonal(model, loss_fn, x, y)
    for pname, p in model.named_parameters():
        close = dict(atol=1e-12, rtol=1e-10, msg=pname)
        torch.testing.assert_close(p.grad_second_moment, grads[pname].square().sum(), **close)
        torch.testing.assert_close(p.ggn_trace, ggn[pname].sum(), **close)
        torch.testing.assert_close(p.ggn_trace_batch, ggn[pname].flatten(1).sum(1), **close)
        torch.testing.assert_close(p.hessian_trace, hessian[pname].sum(), **close)
        assert p.ggn_trace.shape == () and p.ggn_trace_batch.shape == (len(x),)


def test_custom_quantities_accumulate_by_their_declaration() -> None:
    """Two micro-batches: the sums add up, the per-example rows are concatenated (each with its own ``c``)."""
    model, loss_fn = _models()["shared"], _loss("ce")
    batches = [_data(4), _data(3)]
    with sh.extend(model, GradSecondMoment(), GGNTrace(), BatchGGNTrace()):
        for x, y in batches:
            loss_fn(model(x), y).backward()
    refs = [
        (reference.per_example_grads(model, loss_fn, x, y), reference.ggn_diagonal(model, loss_fn, x, y, True))
        for x, y in batches
    ]
    for pname, p in model.named_parameters():
        close = dict(atol=1e-12, rtol=1e-10, msg=pname)
        torch.testing.assert_close(p.grad_second_moment, sum(g[pname].square().sum() for g, _ in refs), **close)
        torch.testing.assert_close(p.ggn_trace, sum(d[pname].sum() for _, d in refs), **close)
        rows = torch.cat([d[pname].flatten(1).sum(1) for _, d in refs])
        torch.testing.assert_close(p.ggn_trace_batch, rows, **close)


def test_custom_quantity_without_a_sink_computes_nothing() -> None:
    """A quantity that declares no sink (the base class's) leaves its attribute unset instead of guessing."""

    @dataclass(frozen=True)
    class Declared(sh.Quantity):
        attribute: ClassVar[str] = "declared_only"
        order: ClassVar[Order] = Order.SECOND

    model, (x, y) = _models()["mlp"], _data()
    with sh.extend(model, Declared(), sh.DiagGGNExact()):
        F.cross_entropy(model(x), y).backward()
    for p in model.parameters():
        assert not hasattr(p, "declared_only") and hasattr(p, "diag_ggn_exact")


def test_custom_quantity_needing_a_missing_rule_method_raises_at_extend() -> None:
    """A rule method that a covered module's rule lacks is refused before any forward pass, in the quantity's words."""

    @dataclass(frozen=True)
    class NeedsKronecker(sh.Quantity):
        attribute: ClassVar[str] = "needs_kronecker"
        order: ClassVar[Order] = Order.SECOND

        @property
        def needs(self) -> Needs:
            return Needs(Columns.EXACT, rule_methods=frozenset({RuleMethod.KRONECKER}))

    model = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    expected = r"NeedsKronecker: module '1' \(LayerNorm\).*kronecker"
    with pytest.raises(sh.UnsupportedModuleError, match=expected), sh.extend(model, NeedsKronecker()):
        pass


def test_quantity_attributes_follow_subclasses_defined_and_deleted() -> None:
    """The cached attribute names see a quantity defined after the first look, and forget it once it is gone."""
    from secorder_hooks.engine.accumulate import quantity_attributes

    gc.collect()  # quantities defined by earlier tests and no longer referenced go first
    before = quantity_attributes()
    assert "grad_batch" in before and "_probe_quantity" not in before

    class Probe(sh.Quantity):
        attribute: ClassVar[str] = "_probe_quantity"
        order: ClassVar[Order] = Order.FIRST

    assert quantity_attributes() == before | {"_probe_quantity"}
    model = nn.Linear(3, 2)
    model.weight._probe_quantity = torch.ones(1)
    sh.clear_quantities(model)  # removes every quantity attribute, the new one included
    assert not hasattr(model.weight, "_probe_quantity")

    del Probe
    gc.collect()
    assert quantity_attributes() == before
