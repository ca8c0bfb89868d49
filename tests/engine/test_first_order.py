"""First-order quantities of extend() on the whole zoo, against torch.func brute force."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from secorder_hooks import BatchGrad, BatchL2Grad, SumGradSquared, Variance, extend
from tests.support import reference, zoo

ALL = (BatchGrad(), SumGradSquared(), BatchL2Grad(), Variance())
TOL = {torch.float64: {"atol": 1e-10, "rtol": 1e-8}, torch.float32: {"atol": 1e-5, "rtol": 1e-4}}


def expected_quantities(case: zoo.Case, reduction: str) -> dict[str, dict[str, Tensor]]:
    """Brute-force grad_batch, sum_grad_squared, batch_l2, variance per trainable parameter, in float64."""
    c64 = case.to(torch.float64)
    pe = reference.per_example_grads(c64.model, c64.loss_fn(reduction), c64.x, c64.y)
    return {
        name: {
            "grad_batch": g,
            "sum_grad_squared": g.square().sum(0),
            "batch_l2": g.flatten(1).square().sum(1),
            "variance": g.var(0, unbiased=False),
        }
        for name, g in pe.items()
    }


def assert_quantities(case: zoo.Case, expected: dict[str, dict[str, Tensor]], attributes: list[str]) -> None:
    tol = TOL[case.x.dtype]
    params = dict(case.model.named_parameters())
    for name, want in expected.items():
        p = params[name]
        for attr in attributes:
            assert hasattr(p, attr), f"{case.name}: parameter '{name}' has no {attr}"
            got = getattr(p, attr)
            assert got.dtype == p.dtype, f"{case.name}: {name}.{attr} has dtype {got.dtype}"
            torch.testing.assert_close(
                got, want[attr].to(got.dtype), **tol, msg=lambda m, w=f"{case.name}: {name}.{attr}": f"{w}: {m}"
            )
    for name, p in params.items():
        if not p.requires_grad:
            for attr in ("grad_batch", "sum_grad_squared", "batch_l2", "variance"):
                assert not hasattr(p, attr), f"frozen parameter '{name}' got {attr}"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_all_first_order_quantities(name: str, dtype: torch.dtype, reduction: str) -> None:
    case = zoo.make(name, dtype)
    expected = expected_quantities(case, reduction)
    assert expected, "the case must have trainable parameters"
    with extend(case.model, *ALL):
        case.loss_fn(reduction)(case.model(case.x), case.y).backward()
    assert_quantities(case, expected, ["grad_batch", "sum_grad_squared", "batch_l2", "variance"])
    for name_, p in case.trainable().items():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, **TOL[dtype], msg=name_)


@pytest.mark.parametrize("quantity", [SumGradSquared(), BatchL2Grad(), Variance()], ids=lambda q: q.attribute)
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_single_quantity_uses_fast_paths(name: str, quantity: object) -> None:
    """Without BatchGrad the rules' closed-form reductions are used; they must agree too."""
    case = zoo.make(name, torch.float64)
    expected = expected_quantities(case, "mean")
    with extend(case.model, quantity):
        case.loss_fn("mean")(case.model(case.x), case.y).backward()
    assert_quantities(case, expected, [quantity.attribute])
    for p in case.trainable().values():
        assert not hasattr(p, "grad_batch")


def test_grad_is_unchanged_by_the_engine() -> None:
    case = zoo.make("resnet_block", torch.float64)
    plain = copy.deepcopy(case.model)
    case.loss_fn()(plain(case.x), case.y).backward()
    with extend(case.model, *ALL):
        case.loss_fn()(case.model(case.x), case.y).backward()
    for (name, p), q in zip(case.model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=0, rtol=0, msg=name)


def test_repeated_backward_recomputes() -> None:
    """Each backward inside one context overwrites the quantities with those of its own batch."""
    case = zoo.make("called_twice", torch.float64)
    loss_fn = case.loss_fn("sum")
    with extend(case.model, *ALL):
        for step, batch_size in enumerate([4, 4, 6]):
            x = torch.randn(batch_size, 4, dtype=torch.float64)
            y = torch.randint(0, 2, (batch_size,))
            case.model.zero_grad()
            loss_fn(case.model(x), y).backward()
            expected = expected_quantities(zoo.Case(case.name, case.model, x, y, case.loss), "sum")
            assert case.model.shared.weight.grad_batch.shape[0] == batch_size, f"step {step}"
            assert_quantities(case, expected, ["grad_batch", "sum_grad_squared", "batch_l2", "variance"])


def test_retain_graph_backward_twice_accumulates_like_grad() -> None:
    """Two passes of one graph: the batch twice, as .grad holds it (rows repeated; the variance is unchanged)."""
    case = zoo.make("mlp_tanh", torch.float64)
    expected = expected_quantities(case, "mean")
    twice = {
        name: {
            "grad_batch": torch.cat([want["grad_batch"]] * 2),
            "sum_grad_squared": 2 * want["sum_grad_squared"],
            "batch_l2": torch.cat([want["batch_l2"]] * 2),
            "variance": want["variance"],
        }
        for name, want in expected.items()
    }
    with extend(case.model, *ALL):
        loss = case.loss_fn()(case.model(case.x), case.y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_quantities(case, twice, ["grad_batch", "sum_grad_squared", "batch_l2", "variance"])


def test_retain_graph_backward_twice_without_accumulation() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    expected = expected_quantities(case, "mean")
    with extend(case.model, *ALL, accumulate=False):
        loss = case.loss_fn()(case.model(case.x), case.y)
        loss.backward(retain_graph=True)
        loss.backward()
    assert_quantities(case, expected, ["grad_batch", "sum_grad_squared", "batch_l2", "variance"])


class _GradientScaled(nn.Module):
    """A Linear whose output gradient a tensor hook doubles, registered after the call (as a parent would)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        out.register_hook(lambda g: 2.0 * g)
        return out


def test_gradient_hooks_on_module_outputs_are_seen() -> None:
    """Per-example gradients follow the gradient autograd propagated, after users' tensor hooks."""
    torch.manual_seed(0)
    model = nn.Sequential(_GradientScaled(), nn.Tanh(), nn.Linear(2, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with extend(model, BatchGrad()):
        model(x).square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, msg=name)


def test_module_called_twice_sums_per_example_before_squaring() -> None:
    """A mistake peers made: squaring per call and summing gives a different (wrong) value."""
    torch.manual_seed(1)
    lin = nn.Linear(3, 3).double()
    model = nn.Sequential(lin, nn.Tanh(), lin)
    x = torch.randn(5, 3, dtype=torch.float64)
    with extend(model, SumGradSquared(), BatchL2Grad()):
        model(x).square().sum().backward()
    # functional_call does not restore the Parameter objects of a module used twice: use a copy
    pe = reference.per_example_grads(copy.deepcopy(model), lambda out, y: out.square().sum(), x, x)
    torch.testing.assert_close(lin.weight.sum_grad_squared, pe["0.weight"].square().sum(0))
    torch.testing.assert_close(lin.bias.batch_l2, pe["0.bias"].square().sum(1))
    # squaring each call's per-example gradient, then summing, gives a clearly different value
    untied = nn.Sequential(copy.deepcopy(lin), nn.Tanh(), copy.deepcopy(lin))
    calls = reference.per_example_grads(untied, lambda out, y: out.square().sum(), x, x)
    wrong = calls["0.weight"].square().sum(0) + calls["2.weight"].square().sum(0)
    torch.testing.assert_close(calls["0.weight"] + calls["2.weight"], pe["0.weight"])
    assert (lin.weight.sum_grad_squared - wrong).abs().max() > 1e-2


def test_examples_are_dim_zero_not_positions() -> None:
    """Sequence model: grad_batch has N rows (positions are summed into their example)."""
    case = zoo.make("sequence", torch.float64)
    with extend(case.model, BatchGrad()):
        case.loss_fn()(case.model(case.x), case.y).backward()
    assert case.model.a.weight.grad_batch.shape == (zoo.N, 5, 4)


@pytest.mark.parametrize("name", zoo.GENERIC)
def test_generic_rule_modules_get_every_parameter(name: str) -> None:
    case = zoo.make(name, torch.float64)
    with extend(case.model, BatchGrad()):
        case.loss_fn()(case.model(case.x), case.y).backward()
    for pname, p in case.trainable().items():
        assert p.grad_batch.shape == (zoo.N, *p.shape), pname
        assert p.grad_batch.abs().sum() > 0, f"{pname} got an all-zero grad_batch"
