"""The function API (issue 4): Fisher diagonals and traces against brute force, and their relations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secorder_hooks import (
    SumGradSquared,
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    extend,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
    model_hessian_diagonal,
)
from secorder_hooks.function_api.backend import Backend, use_backend
from tests.support import reference
from tests.support.checks import assert_all_close
from tests.support.zoo import make

BACKENDS = [Backend.GENERIC, Backend.ENGINE, Backend.AUTO]
FIRST_ORDER_CASES = ["mlp_relu", "mlp_sigmoid", "cnn", "functional", "called_twice", "sequence", "frozen"]


def _aligned(model: nn.Module, ref: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [ref[k] if k in ref else torch.zeros_like(p) for k, p in model.named_parameters()]


def _empirical_reference(model, loss_fn, x, y, c: float) -> list[torch.Tensor]:
    pe = reference.per_example_grads(model, loss_fn, x, y)  # c * grad l_n
    return _aligned(model, {k: (g**2).sum(0) / c for k, g in pe.items()})


def _c(case, reduction: str) -> float:
    if reduction == "sum":
        return 1.0
    out = case.model(case.x)
    return 1.0 / (out.numel() if isinstance(case.loss_fn(), nn.MSELoss) else out.numel() // out.shape[1])


# ----------------------------------------------------------------------------- empirical
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("name", FIRST_ORDER_CASES)
def test_empirical_fisher_diagonal_zoo(name: str, backend: Backend, reduction: str) -> None:
    case = make(name, torch.float64)
    loss_fn = case.loss_fn(reduction)
    expected = _empirical_reference(case.model, loss_fn, case.x, case.y, _c(case, reduction))
    with use_backend(backend):
        diag = empirical_fisher_diagonal(case.model, loss_fn, case.x, case.y)
        trace = empirical_fisher_trace(case.model, loss_fn, case.x, case.y)
    assert_all_close(diag, expected)
    assert trace.dim() == 0
    torch.testing.assert_close(trace, sum(e.sum() for e in expected))


def test_empirical_is_n_times_sum_grad_squared_for_ce_mean() -> None:
    case = make("mlp_tanh", torch.float64)
    with extend(case.model, SumGradSquared()):
        nn.CrossEntropyLoss()(case.model(case.x), case.y).backward()
    sgs = [p.sum_grad_squared.clone() for p in case.model.parameters()]
    diag = empirical_fisher_diagonal(case.model, nn.CrossEntropyLoss(), case.x, case.y)
    assert_all_close(diag, [case.x.shape[0] * s for s in sgs])
    # ... and not the square of the batch gradient
    grads = torch.autograd.grad(F.cross_entropy(case.model(case.x), case.y), list(case.model.parameters()))
    assert not torch.allclose(diag[0], grads[0] ** 2)


@pytest.mark.parametrize("backend", [Backend.GENERIC, Backend.AUTO], ids=lambda b: b.value)
def test_empirical_weighted_ignored_and_functional_losses(backend: Backend) -> None:
    case = make("mlp_tanh", torch.float64)
    y = case.y.clone()
    y[0] = -100
    weight = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    loss_fn = nn.CrossEntropyLoss(weight=weight)
    c = 1.0 / weight[y[1:]].sum().item()
    with use_backend(backend):
        diag = empirical_fisher_diagonal(case.model, loss_fn, case.x, y)
        functional = empirical_fisher_diagonal(case.model, lambda o, t: F.cross_entropy(o, t, weight=weight), case.x, y)
    expected = _empirical_reference(case.model, loss_fn, case.x, y, c)
    assert_all_close(diag, expected)
    assert_all_close(functional, expected)


def test_empirical_needs_a_standard_loss() -> None:
    from secorder_hooks.errors import UnsupportedLossError

    case = make("mlp_tanh", torch.float64)
    for backend in (Backend.GENERIC, Backend.AUTO):
        with use_backend(backend), pytest.raises(UnsupportedLossError, match="standard loss"):
            empirical_fisher_diagonal(case.model, lambda o, t: 2 * F.cross_entropy(o, t), case.x, case.y)


def test_empirical_keeps_grad() -> None:
    case = make("mlp_relu", torch.float64)
    empirical_fisher_diagonal(case.model, case.loss_fn(), case.x, case.y)
    assert all(p.grad is None and not hasattr(p, "sum_grad_squared") for p in case.model.parameters())


# ----------------------------------------------------------------------------- generalized
GGN_CASES = [
    ("mlp_tanh", "nll", nn.CrossEntropyLoss),
    ("cnn", "cross_entropy", nn.CrossEntropyLoss),
    ("mlp_sigmoid", "mse", nn.MSELoss),
    ("sequence", "gaussian", nn.MSELoss),
    ("functional", "nll", nn.CrossEntropyLoss),
]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(("name", "loss_type", "loss_cls"), GGN_CASES)
def test_generalized_fisher_diagonal_zoo(name, loss_type, loss_cls, reduction) -> None:
    case = make(name, torch.float64)
    expected = _aligned(case.model, reference.ggn_diagonal(case.model, loss_cls(reduction=reduction), case.x, case.y))
    diag = generalized_fisher_diagonal(case.model, case.model(case.x), case.y, loss_type, reduction=reduction)
    assert_all_close(diag, expected)
    trace = generalized_fisher_trace(case.model, case.model(case.x), case.y, loss_type, reduction=reduction)
    torch.testing.assert_close(trace, sum(e.sum() for e in expected))


@pytest.mark.parametrize("loss_type", ["bce", "bernoulli", "BCE"])
def test_generalized_fisher_bernoulli(loss_type: str) -> None:
    case = make("mlp_tanh", torch.float64)
    y = torch.rand(case.x.shape[0], 3, dtype=torch.float64)
    expected = _aligned(case.model, reference.ggn_diagonal(case.model, nn.BCEWithLogitsLoss(), case.x, y))
    assert_all_close(generalized_fisher_diagonal(case.model, case.model(case.x), y, loss_type), expected)


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_generalized_fisher_of_outputs_recorded_by_extend(backend: Backend) -> None:
    case = make("deep_mlp", torch.float64)
    expected = _aligned(case.model, reference.ggn_diagonal(case.model, nn.CrossEntropyLoss(), case.x, case.y))
    with use_backend(backend), extend(case.model):
        outputs = case.model(case.x)
        diag = generalized_fisher_diagonal(case.model, outputs, case.y, "nll")
    assert_all_close(diag, expected)


def test_generalized_equals_hessian_for_linear_model_with_mse() -> None:
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    ggn = generalized_fisher_diagonal(model, model(x), y, "mse")
    assert_all_close(ggn, model_hessian_diagonal(model, nn.MSELoss(), x, y))


def test_generalized_mc_is_unbiased_and_reproducible() -> None:
    case = make("mlp_tanh", torch.float64)
    expected = _aligned(case.model, reference.ggn_diagonal(case.model, nn.CrossEntropyLoss(), case.x, case.y))
    out = case.model(case.x)
    est = generalized_fisher_diagonal(
        case.model, out, case.y, mc_samples=4000, generator=torch.Generator().manual_seed(1)
    )
    again = generalized_fisher_diagonal(
        case.model, out, case.y, mc_samples=4000, generator=torch.Generator().manual_seed(1)
    )
    assert_all_close(est, again)
    for e, r in zip(est, expected):
        torch.testing.assert_close(e, r, rtol=0.15, atol=1e-3 * r.abs().max().item())


def test_generalized_create_graph() -> None:
    case = make("mlp_tanh", torch.float64)
    diag = generalized_fisher_diagonal(case.model, case.model(case.x), case.y, create_graph=True)
    assert diag[0].requires_grad
    assert_all_close(
        [d.detach() for d in diag],
        _aligned(case.model, reference.ggn_diagonal(case.model, nn.CrossEntropyLoss(), case.x, case.y)),
    )


def test_traces_reject_num_samples_below_one() -> None:
    case = make("mlp_tanh", torch.float64)
    with pytest.raises(ValueError, match="num_samples"):
        empirical_fisher_trace(case.model, case.loss_fn(), case.x, case.y, num_samples=0)
    with pytest.raises(ValueError, match="num_samples"):
        generalized_fisher_trace(case.model, case.model(case.x), case.y, num_samples=0)
    # num_samples does not change the exact result
    a = empirical_fisher_trace(case.model, case.loss_fn(), case.x, case.y, num_samples=1)
    b = empirical_fisher_trace(case.model, case.loss_fn(), case.x, case.y, num_samples=50)
    torch.testing.assert_close(a, b)
