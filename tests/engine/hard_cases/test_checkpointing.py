"""Activation checkpointing inside the model, against brute force on the same model without it (float64).

``use_reentrant=False``: every quantity is exact. ``use_reentrant=True``: the block is
recomputed inside its own backward, which then refuses the engine's further backward
passes; first-order quantities are exact, the others raise the package's error naming
checkpointing and the remedy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

import secorder_hooks as sh
from tests.support import reference

FIRST_ORDER = (sh.BatchGrad(), sh.SumGradSquared(), sh.BatchL2Grad(), sh.Variance())
CURVATURE = (sh.DiagGGNExact(), sh.BatchDiagGGNExact(), sh.DiagHessian(), sh.BatchDiagHessian())
TOL = {"atol": 1e-10, "rtol": 1e-8}


class Checkpointed(nn.Module):
    """Linear-tanh, a checkpointed residual block (Linear-tanh-Linear, optionally weight-normed), Linear.

    Attributes:
        mode: ``None`` (no checkpointing, the reference), ``"reentrant"`` or ``"non_reentrant"``.
        whole: Checkpoint the whole forward instead of the block.
    """

    def __init__(self, parametrized: bool = False, whole: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.block = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        self.c = nn.Linear(4, 3)
        if parametrized:
            parametrizations.weight_norm(self.block[0])
        self.mode: str | None = None
        self.whole = whole

    def _block(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.block(h)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        h = self._checkpoint(self._block, h) if not self.whole else self._block(h)
        return self.c(h)

    def _checkpoint(self, fn, x):
        if self.mode is None:
            return fn(x)
        return checkpoint(fn, x, use_reentrant=self.mode == "reentrant")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.whole:
            return self._checkpoint(self._forward, x)
        return self._forward(x)


def make(parametrized: bool = False, whole: bool = False):
    torch.manual_seed(0)
    model = Checkpointed(parametrized, whole).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=whole)
    return model, x, torch.randint(0, 3, (5,))


def run(model, x, y, reduction, mode, *quantities):
    model.zero_grad()
    model.mode = mode
    try:
        with sh.extend(model, *quantities):
            nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
    finally:
        model.mode = None


def check_first_order(model, x, y, reduction):
    expected = reference.per_example_grads(model, nn.CrossEntropyLoss(reduction=reduction), x.detach(), y)
    for name, p in model.named_parameters():
        g = expected[name]
        torch.testing.assert_close(p.grad_batch, g, **TOL, msg=name)
        torch.testing.assert_close(p.grad, g.sum(0), **TOL)
        torch.testing.assert_close(p.sum_grad_squared, g.square().sum(0), **TOL)
        torch.testing.assert_close(p.batch_l2, g.reshape(len(g), -1).square().sum(1), **TOL)
        torch.testing.assert_close(p.variance, g.var(0, unbiased=False), **TOL)


def check_curvature(model, x, y, reduction):
    fn = nn.CrossEntropyLoss(reduction=reduction)
    x = x.detach()
    expected = {
        "diag_ggn_exact": reference.ggn_diagonal(model, fn, x, y),
        "diag_ggn_exact_batch": reference.ggn_diagonal(model, fn, x, y, per_example=True),
        "diag_h": reference.hessian_diagonal(model, fn, x, y) if not _parametrized(model) else None,
        "diag_h_batch": reference.per_example_hessian_diagonal(model, fn, x, y) if not _parametrized(model) else None,
    }
    if _parametrized(model):  # _weight_norm has no forward-mode derivative: reverse over reverse
        expected["diag_h"], expected["diag_h_batch"] = reference.hessian_diagonals_reverse_mode(model, fn, x, y)
    for attribute, values in expected.items():
        for name, p in model.named_parameters():
            torch.testing.assert_close(getattr(p, attribute), values[name], **TOL, msg=f"{attribute} {name}")


def _parametrized(model) -> bool:
    return any("original" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("parametrized", "whole"), [(False, False), (True, False), (False, True)])
def test_non_reentrant_every_quantity(parametrized, whole, reduction):
    model, x, y = make(parametrized, whole)
    run(model, x, y, reduction, "non_reentrant", *FIRST_ORDER, *CURVATURE)
    check_first_order(model, x, y, reduction)
    check_curvature(model, x, y, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("whole", [False, True])
def test_reentrant_first_order_is_exact(whole, reduction):
    model, x, y = make(whole=whole)
    run(model, x, y, reduction, "reentrant", *FIRST_ORDER)
    check_first_order(model, x, y, reduction)


@pytest.mark.parametrize("quantity", [*CURVATURE, sh.DiagGGNMC()], ids=lambda q: type(q).__name__)
def test_reentrant_curvature_raises_with_the_remedy(quantity):
    model, x, y = make()
    with pytest.raises(sh.ExtensionError, match=r"checkpointing with use_reentrant=True.*use_reentrant=False"):
        run(model, x, y, "mean", "reentrant", quantity)
    for p in model.parameters():
        assert not hasattr(p, quantity.attribute)
    run(model, x, y, "mean", None, sh.BatchGrad())  # no hook or record left behind: the model works as before
    check_first_order_batch_only(model, x, y)


def check_first_order_batch_only(model, x, y):
    expected = reference.per_example_grads(model, nn.CrossEntropyLoss(), x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, expected[name], **TOL)


def test_reentrant_parametrized_layer_raises_with_the_remedy():
    model, x, y = make(parametrized=True)
    with pytest.raises(sh.ExtensionError, match=r"'block.0' has a parametrized tensor.*use_reentrant=False"):
        run(model, x, y, "mean", "reentrant", sh.BatchGrad())


def test_monte_carlo_fisher_non_reentrant_matches_without_checkpointing():
    """The same samples (same generator) with and without checkpointing give the same estimate."""
    model, x, y = make(parametrized=True)
    results = []
    for mode in (None, "non_reentrant"):
        run(model, x, y, "mean", mode, sh.DiagGGNMC(mc_samples=4, generator=torch.Generator().manual_seed(1)))
        results.append([p.diag_ggn_mc.clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **TOL)
