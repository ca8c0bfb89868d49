"""Quantities accumulate over backward passes (micro-batches) exactly as ``.grad`` does."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import secorder_hooks as sh
from secorder_hooks import (
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    ExtensionError,
    SumGradSquared,
    Variance,
    clear_quantities,
    extend,
)
from tests.support import reference, zoo

EVERY = (
    BatchGrad(),
    SumGradSquared(),
    BatchL2Grad(),
    Variance(),
    DiagGGNExact(),
    BatchDiagGGNExact(),
    DiagHessian(),
    BatchDiagHessian(),
)
HESSIANS = {"diag_h", "diag_h_batch"}
NO_HESSIAN = {"called_twice"}  # a weight shared by two factors of a product: DiagHessian raises
TOL = {"atol": 1e-10, "rtol": 1e-8}
SPLIT = [1, 2, 1]  # k = 3 unequal micro-batches of the zoo's N = 4 examples


def brute_force(case: zoo.Case, x: Tensor, y: Tensor, reduction: str, scale: float = 1.0) -> dict[str, dict]:
    """Every quantity of ``scale * loss(model(x), y)`` from torch.func / autograd, per parameter."""

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        return scale * case.loss_fn(reduction)(out, target)

    grads = reference.per_example_grads(case.model, loss_fn, x, y)
    result = {
        "grad_batch": grads,
        "batch_l2": {k: g.flatten(1).square().sum(1) for k, g in grads.items()},
        "diag_ggn_exact_batch": reference.ggn_diagonal(case.model, loss_fn, x, y, per_example=True),
    }
    if case.name not in NO_HESSIAN:
        result["diag_h_batch"] = reference.per_example_hessian_diagonal(case.model, loss_fn, x, y)
    return result


def with_sums(per_example: dict[str, dict]) -> dict[str, dict]:
    """Add the summed quantities and the variance, computed from the per-example ones."""
    grads = per_example["grad_batch"]
    sums = {
        "sum_grad_squared": {k: g.square().sum(0) for k, g in grads.items()},
        "variance": {k: g.var(0, unbiased=False) for k, g in grads.items()},
        "diag_ggn_exact": {k: v.sum(0) for k, v in per_example["diag_ggn_exact_batch"].items()},
    }
    if "diag_h_batch" in per_example:
        sums["diag_h"] = {k: v.sum(0) for k, v in per_example["diag_h_batch"].items()}
    return {**per_example, **sums}


def concatenated(parts: list[dict[str, dict]]) -> dict[str, dict]:
    return {a: {k: torch.cat([p[a][k] for p in parts]) for k in parts[0][a]} for a in parts[0]}


def micro_batches(case: zoo.Case, reduction: str, scales: list[float], **options) -> None:
    """One extend() context, one forward and backward per micro-batch, no zero_grad in between."""
    assert len(scales) == len(SPLIT)
    quantities = [q for q in EVERY if case.name not in NO_HESSIAN or q.attribute not in HESSIANS]
    with extend(case.model, *quantities, **options):
        for (x, y), scale in zip(zip(case.x.split(SPLIT), case.y.split(SPLIT)), scales):
            (scale * case.loss_fn(reduction)(case.model(x), y)).backward()


def assert_quantities(case: zoo.Case, want: dict[str, dict]) -> None:
    for attribute, values in want.items():
        for name, p in case.model.named_parameters():
            torch.testing.assert_close(getattr(p, attribute), values[name], **TOL, msg=f"{attribute} of {name}")


@pytest.mark.parametrize(
    "name", ["mlp_tanh", pytest.param("resnet_block", marks=pytest.mark.slow), "called_twice", "sequence"]
)
def test_sum_reduction_micro_batches_equal_the_concatenated_batch(name: str) -> None:
    case = zoo.make(name, torch.float64)
    micro_batches(case, "sum", [1.0] * len(SPLIT))
    assert_quantities(case, with_sums(brute_force(case, case.x, case.y, "sum")))
    for p in case.model.parameters():
        torch.testing.assert_close(p.grad_batch.sum(0), p.grad, **TOL)


@pytest.mark.parametrize("name", ["mlp_tanh", "sequence"])
def test_mean_reduction_each_micro_batch_has_its_own_factor(name: str) -> None:
    """As with .grad: each micro-batch's terms carry c of its own mean; rows concatenate, sums add up."""
    case = zoo.make(name, torch.float64)
    micro_batches(case, "mean", [1.0] * len(SPLIT))
    parts = [brute_force(case, x, y, "mean") for x, y in zip(case.x.split(SPLIT), case.y.split(SPLIT))]
    assert_quantities(case, with_sums(concatenated(parts)))


@pytest.mark.parametrize("name", ["mlp_tanh", "sequence"])
def test_mean_reduction_weighted_by_micro_batch_size_equals_the_concatenated_batch(name: str) -> None:
    """Scaling micro-batch b's mean loss by N_b / N gives exactly the mean over the concatenation."""
    case = zoo.make(name, torch.float64)
    micro_batches(case, "mean", [n / sum(SPLIT) for n in SPLIT])
    assert_quantities(case, with_sums(brute_force(case, case.x, case.y, "mean")))


def test_equal_micro_batches_of_a_mean_loss_scale_by_k_and_k_squared() -> None:
    """k equal micro-batches of a mean loss: k times the concatenation's c, so k x linear and k^2 x squares."""
    case, k = zoo.make("mlp_tanh", torch.float64), 2
    with extend(case.model, BatchGrad(), SumGradSquared(), DiagGGNExact()):
        for x, y in zip(case.x.chunk(k), case.y.chunk(k)):
            case.loss_fn("mean")(case.model(x), y).backward()
    want = with_sums(brute_force(case, case.x, case.y, "mean"))
    for name, p in case.model.named_parameters():
        torch.testing.assert_close(p.grad_batch, k * want["grad_batch"][name], **TOL)
        torch.testing.assert_close(p.sum_grad_squared, k**2 * want["sum_grad_squared"][name], **TOL)
        torch.testing.assert_close(p.diag_ggn_exact, k * want["diag_ggn_exact"][name], **TOL)


def test_monte_carlo_fisher_adds_the_passes_estimates() -> None:
    """Each pass's estimate is unbiased for its GGN (tested with the loss terms); the accumulation adds them."""
    case = zoo.make("mlp_tanh", torch.float64)
    batches = list(zip(case.x.split(SPLIT), case.y.split(SPLIT)))
    alone = []
    for seed, (x, y) in enumerate(batches):
        case.model.zero_grad()
        with extend(case.model, DiagGGNMC(3, torch.Generator().manual_seed(seed))):
            case.loss_fn()(case.model(x), y).backward()
        alone.append([p.diag_ggn_mc for p in case.model.parameters()])
    case.model.zero_grad()
    for seed, (x, y) in enumerate(batches):
        with extend(case.model, DiagGGNMC(3, torch.Generator().manual_seed(seed))):
            case.loss_fn()(case.model(x), y).backward()
    for i, p in enumerate(case.model.parameters()):
        torch.testing.assert_close(p.diag_ggn_mc, sum(a[i] for a in alone), **TOL)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_starts_a_new_accumulation(set_to_none: bool) -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    with extend(case.model, *EVERY):
        for _ in range(2):
            case.loss_fn("sum")(case.model(case.x), case.y).backward()
        case.model.zero_grad(set_to_none=set_to_none)
        x, y = case.x[:3], case.y[:3]
        case.loss_fn("sum")(case.model(x), y).backward()
    assert_quantities(case, with_sums(brute_force(case, x, y, "sum")))


def test_accumulation_across_contexts() -> None:
    """The window is the parameters' (.grad's), not the context's."""
    case = zoo.make("mlp_tanh", torch.float64)
    for x, y in zip(case.x.split(SPLIT), case.y.split(SPLIT)):
        with extend(case.model, *EVERY):
            case.loss_fn("sum")(case.model(x), y).backward()
    assert_quantities(case, with_sums(brute_force(case, case.x, case.y, "sum")))


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.heads = nn.ModuleList([nn.Linear(4, 2), nn.Linear(4, 2)])

    def forward(self, x: Tensor, head: int) -> Tensor:
        return self.heads[head](torch.tanh(self.body(x)))


def test_a_parameter_a_pass_does_not_reach_gets_zero_rows() -> None:
    """Rows stay aligned with the examples of all passes: a head unused by a pass has zero gradient there."""
    torch.manual_seed(0)
    model = TwoHeads().double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    parts = [(x[:2], y[:2], 0), (x[2:], y[2:], 1)]
    with extend(model, BatchGrad(), BatchL2Grad(), SumGradSquared(), Variance(), BatchDiagGGNExact()):
        for xb, yb, head in parts:
            F.cross_entropy(model(xb, head), yb, reduction="sum").backward()
    loss_fns = [lambda out, t: F.cross_entropy(out, t, reduction="sum")] * 2
    rows = []
    for (xb, yb, head), loss_fn in zip(parts, loss_fns):

        class Fixed(nn.Module):
            def __init__(self, head: int = head) -> None:
                super().__init__()
                self.model, self.head = model, head

            def forward(self, x: Tensor) -> Tensor:
                return self.model(x, self.head)

        fixed = Fixed()
        grads = reference.per_example_grads(fixed, loss_fn, xb, yb)
        ggn = reference.ggn_diagonal(fixed, loss_fn, xb, yb, per_example=True)
        rows.append({"grad_batch": grads, "diag_ggn_exact_batch": ggn})
    for name, p in model.named_parameters():
        want = torch.cat([r["grad_batch"][f"model.{name}"] for r in rows])
        torch.testing.assert_close(p.grad_batch, want, **TOL)
        torch.testing.assert_close(p.batch_l2, want.flatten(1).square().sum(1), **TOL)
        torch.testing.assert_close(p.sum_grad_squared, want.square().sum(0), **TOL)
        torch.testing.assert_close(p.variance, want.var(0, unbiased=False), **TOL)
        ggn = torch.cat([r["diag_ggn_exact_batch"][f"model.{name}"] for r in rows])
        torch.testing.assert_close(p.diag_ggn_exact_batch, ggn, **TOL)
    assert model.heads[0].weight.grad_batch[2:].abs().max() == 0
    assert model.heads[1].weight.grad_batch[:2].abs().max() == 0


def test_backward_outside_the_context_then_inside_raises() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    with extend(case.model, SumGradSquared()):
        case.loss_fn()(case.model(case.x), case.y).backward()
    case.loss_fn()(case.model(case.x), case.y).backward()  # .grad changes, the quantities cannot
    match = r"'0\.weight'.*no backward pass inside extend\(\).*zero_grad"
    with pytest.raises(ExtensionError, match=match), extend(case.model, SumGradSquared()):
        case.loss_fn()(case.model(case.x), case.y).backward()


def test_accumulate_false_gives_each_pass_alone() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    case.loss_fn("sum")(case.model(case.x), case.y).backward()  # a gradient from outside the context
    x, y = case.x[:3], case.y[:3]
    with extend(case.model, *EVERY, accumulate=False):
        for _ in range(2):
            case.loss_fn("sum")(case.model(x), y).backward()
    assert_quantities(case, with_sums(brute_force(case, x, y, "sum")))


def test_a_quantity_missing_from_earlier_passes_raises() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    with extend(case.model, SumGradSquared()):
        case.loss_fn()(case.model(case.x), case.y).backward()
    match = r"did not compute \['diag_ggn_exact'\].*zero_grad"
    with pytest.raises(ExtensionError, match=match), extend(case.model, SumGradSquared(), DiagGGNExact()):
        case.loss_fn()(case.model(case.x), case.y).backward()


def test_quantities_of_other_passes_are_removed() -> None:
    """After a backward pass, every quantity on a parameter describes the same passes as .grad."""
    case = zoo.make("mlp_tanh", torch.float64)
    with extend(case.model, SumGradSquared(), DiagGGNExact()):
        case.loss_fn()(case.model(case.x), case.y).backward()
    with extend(case.model, SumGradSquared()):
        case.loss_fn()(case.model(case.x), case.y).backward()  # .grad now holds two passes
    assert all(not hasattr(p, "diag_ggn_exact") and hasattr(p, "sum_grad_squared") for p in case.model.parameters())


def test_clear_quantities() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    with extend(case.model, *EVERY):
        case.loss_fn()(case.model(case.x), case.y).backward()
    clear_quantities(case.model)
    attributes = {q.attribute for q in EVERY}
    assert all(not attributes & set(vars(p)) for p in case.model.parameters())
    assert all(p.grad is not None for p in case.model.parameters())
    case.model.zero_grad()
    with extend(case.model, SumGradSquared()):
        case.loss_fn("sum")(case.model(case.x), case.y).backward()
    want = with_sums(brute_force(case, case.x, case.y, "sum"))
    assert_quantities(case, {"sum_grad_squared": want["sum_grad_squared"]})


def test_an_error_in_the_backward_pass_removes_the_quantities() -> None:
    """.grad has changed when the engine raises after the ordinary backward: stale quantities must not stay."""
    case = zoo.make("mlp_tanh", torch.float64)
    with extend(case.model, SumGradSquared()):
        case.loss_fn()(case.model(case.x), case.y).backward()
    with pytest.raises(ExtensionError, match="penalty"), extend(case.model, SumGradSquared()):
        (case.loss_fn()(case.model(case.x), case.y) + case.model[0].weight.square().sum()).backward()
    assert all(not hasattr(p, "sum_grad_squared") for p in case.model.parameters())


def test_nested_contexts_raise() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    with extend(case.model, BatchGrad()):
        match = r"inside another active extend\(\).*BatchGrad\(\).*one context"
        with pytest.raises(ExtensionError, match=match), extend(case.model, SumGradSquared()):
            pass
        with pytest.raises(ExtensionError, match="inside another active"), extend(case.model[0], SumGradSquared()):
            pass
        case.loss_fn()(case.model(case.x), case.y).backward()  # the outer context still works
    assert all(hasattr(p, "grad_batch") for p in case.model.parameters())


def test_function_api_inside_a_context_leaves_it_untouched() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    loss_fn = case.loss_fn()
    with extend(case.model, BatchGrad(), SumGradSquared()):
        loss_fn(case.model(case.x), case.y).backward()
        before = [(p.grad.clone(), p.grad_batch.clone(), p.sum_grad_squared.clone()) for p in case.model.parameters()]
        output = case.model(case.x)  # recorded by the user's context, backpropagated below
        hessian = sh.model_hessian_diagonal(case.model, loss_fn, case.x, case.y)
        empirical = sh.empirical_fisher_diagonal(case.model, loss_fn, case.x, case.y)
        loss_fn(output, case.y).backward()  # accumulates into the user's quantities
    want = reference.hessian_diagonal(case.model, loss_fn, case.x, case.y)
    for (name, p), h, e, (grad, grad_batch, sum_sq) in zip(case.model.named_parameters(), hessian, empirical, before):
        torch.testing.assert_close(h, want[name], **TOL)
        torch.testing.assert_close(e, sum_sq / (1 / zoo.N), **TOL)
        torch.testing.assert_close(p.grad, 2 * grad, **TOL)
        torch.testing.assert_close(p.grad_batch, torch.cat([grad_batch, grad_batch]), **TOL)
        torch.testing.assert_close(p.sum_grad_squared, 2 * sum_sq, **TOL)


def test_accumulate_must_be_a_bool() -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="accumulate"), extend(model, BatchGrad(), accumulate="yes"):
        pass
