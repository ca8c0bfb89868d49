"""Parametrized weights (weight norm, spectral norm, orthogonal) against brute force in float64.

The trainable parameters are the parametrizations' originals; the references differentiate
the model as a function of them (``torch.func.functional_call`` re-evaluates the
parametrization), so they include the chain rule and the parametrization's own second
derivative independently of the engine.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize

import secorder_hooks as sh
from tests.support import reference

FIRST_ORDER = (sh.BatchGrad(), sh.SumGradSquared(), sh.BatchL2Grad(), sh.Variance())
CURVATURE = (sh.DiagGGNExact(), sh.BatchDiagGGNExact(), sh.DiagHessian(), sh.BatchDiagHessian())


class LearnedScale(nn.Module):
    """A user parametrization with a parameter of its own: ``W -> exp(s) * W``."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.exp(self.s) * w


def _legacy_weight_norm(module: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.weight_norm(module)


def _legacy_spectral_norm(module: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.nn.utils.spectral_norm(module)


PARAMETRIZE = {
    "weight_norm": parametrizations.weight_norm,
    "spectral_norm": parametrizations.spectral_norm,
    "orthogonal": parametrizations.orthogonal,
    "legacy_weight_norm": _legacy_weight_norm,
    "legacy_spectral_norm": _legacy_spectral_norm,
    "learned_scale": lambda m: parametrize.register_parametrization(m, "weight", LearnedScale()),
}


def make(kind: str, layer: str, training: bool = True) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A small model whose first layer (Linear or Conv2d) and last Linear are parametrized."""
    torch.manual_seed(0)
    if layer == "linear":
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
        x = torch.randn(5, 3)
    else:
        model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3))
        x = torch.randn(5, 2, 3, 3)
    model = model.double()
    PARAMETRIZE[kind](model[0])
    PARAMETRIZE[kind](model[-1])
    model.train(training)
    return model, x.double(), torch.randint(0, 3, (5,))


def loss_fn(reduction: str):
    return nn.CrossEntropyLoss(reduction=reduction)


def run(model, x, y, reduction, *quantities):
    model.zero_grad()
    with sh.extend(model, *quantities):
        loss_fn(reduction)(model(x), y).backward()


def references(model, x, y, reduction):
    """Brute force after the engine's forward pass, in eval mode (spectral norm's vectors as the forward used them)."""
    model.eval()
    fn = loss_fn(reduction)
    diag_h, diag_h_batch = reference.hessian_diagonals_reverse_mode(model, fn, x, y)
    return {
        "grad_batch": reference.per_example_grads(model, fn, x, y),
        "diag_ggn_exact": reference.ggn_diagonal(model, fn, x, y),
        "diag_ggn_exact_batch": reference.ggn_diagonal(model, fn, x, y, per_example=True),
        "diag_h": diag_h,
        "diag_h_batch": diag_h_batch,
    }


def assert_close(model, attribute, expected):
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("original" in n or n.endswith(("_g", "_v", "_orig", ".s")) for n in names)
    for name in names:
        torch.testing.assert_close(
            getattr(model.get_parameter(name), attribute), expected[name], atol=1e-10, rtol=1e-8, msg=name
        )


CASES = [(kind, "linear", True) for kind in PARAMETRIZE] + [
    ("spectral_norm", "linear", False),
    ("weight_norm", "conv", True),
    ("spectral_norm", "conv", False),
    ("orthogonal", "conv", True),
    ("legacy_weight_norm", "conv", True),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("kind", "layer", "training"), CASES)
def test_every_quantity_matches_brute_force(kind, layer, training, reduction):
    model, x, y = make(kind, layer, training)
    run(model, x, y, reduction, *FIRST_ORDER, *CURVATURE)
    attached = {
        name: {q.attribute: getattr(p, q.attribute) for q in (*FIRST_ORDER, *CURVATURE)}
        for name, p in model.named_parameters()
    }
    expected = references(model, x, y, reduction)
    for attribute in ("grad_batch", "diag_ggn_exact", "diag_ggn_exact_batch", "diag_h", "diag_h_batch"):
        assert_close(model, attribute, expected[attribute])
    for name, p in model.named_parameters():
        g = expected["grad_batch"][name]
        torch.testing.assert_close(g.sum(0), p.grad, atol=1e-10, rtol=1e-8)
        got = attached[name]
        torch.testing.assert_close(got["sum_grad_squared"], g.square().sum(0), atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(got["batch_l2"], g.reshape(len(g), -1).square().sum(1), atol=1e-10, rtol=1e-8)
        torch.testing.assert_close(got["variance"], g.var(0, unbiased=False), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    "kind",
    [
        "weight_norm",
        "spectral_norm",
        pytest.param("orthogonal", marks=pytest.mark.slow),
        pytest.param("legacy_weight_norm", marks=pytest.mark.slow),
    ],
)
def test_monte_carlo_fisher_is_unbiased(kind):
    model, x, y = make(kind, "linear")
    model.eval()  # the same spectral-norm vectors in every run
    exact = reference.ggn_diagonal(model, loss_fn("mean"), x, y)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(30):
        run(model, x, y, "mean", sh.DiagGGNMC(mc_samples=16, generator=generator))
        samples.append(torch.cat([p.diag_ggn_mc.flatten() for p in model.parameters()]))
    samples = torch.stack(samples)
    expected = torch.cat([exact[k].flatten() for k, _ in model.named_parameters()])
    standard_error = samples.std(0) / len(samples) ** 0.5
    assert ((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-12).all()


@pytest.mark.parametrize("kind", ["spectral_norm", "legacy_weight_norm", "legacy_spectral_norm", "orthogonal"])
def test_the_engine_leaves_the_parametrization_state_alone(kind):
    """Rules read the weight the forward used: no second power iteration, no right_inverse, hooks restored."""
    model, x, y = make(kind, "linear")
    plain, _, _ = make(kind, "linear")  # the same model (seeded)
    run(model, x, y, "mean", *FIRST_ORDER, *CURVATURE, sh.DiagGGNMC())
    loss_fn("mean")(plain(x), y).backward()
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    for module, twin in zip(model.modules(), plain.modules()):  # the engine's hooks are gone, the model's kept
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks"):
            assert [type(h) for h in getattr(module, hooks).values()] == [
                type(h) for h in getattr(twin, hooks).values()
            ]


def test_parametrized_module_with_the_generic_rule():
    """A module without a rule: the generic rule differentiates it in its effective weight."""

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 3))

        def forward(self, x):
            return torch.sin(x @ self.weight.T)

    torch.manual_seed(0)
    model = nn.Sequential(Scaled(), nn.Linear(4, 3)).double()
    parametrizations.weight_norm(model[0])
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 3, (5,))
    run(model, x, y, "sum", sh.BatchGrad(), sh.DiagGGNExact())
    assert_close(model, "grad_batch", reference.per_example_grads(model, loss_fn("sum"), x, y))
    assert_close(model, "diag_ggn_exact", reference.ggn_diagonal(model, loss_fn("sum"), x, y))
    with pytest.raises(sh.UnsupportedModuleError, match=r"reparametrized tensor 'weight'.*DiagGGNExact"):
        run(model, x, y, "sum", sh.DiagHessian())


def test_reductions_in_slices_of_vectors_agree(monkeypatch):
    """The reductions process a slice of the vectors at a time (bounded memory): one vector per slice agrees."""
    from secorder_hooks.rules import reparametrized

    quantities = (sh.SumGradSquared(), sh.BatchL2Grad(), sh.DiagGGNExact(), sh.BatchDiagHessian())
    model, x, y = make("orthogonal", "conv")
    run(model, x, y, "mean", *quantities)
    before = [[getattr(p, q.attribute).clone() for q in quantities] for p in model.parameters()]
    monkeypatch.setattr(reparametrized, "VECTOR_ELEMENTS", 1)
    run(model, x, y, "mean", *quantities)
    for values, p in zip(before, model.parameters()):
        for value, q in zip(values, quantities):
            torch.testing.assert_close(getattr(p, q.attribute), value, atol=1e-12, rtol=1e-10)
