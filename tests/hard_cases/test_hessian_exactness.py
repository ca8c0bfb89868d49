"""DiagHessian through scalings by constants; the documented limits (a weight used twice in a chain)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secorder_hooks import DiagGGNExact, DiagHessian, UnsupportedOperationError, extend
from tests import reference

DT = torch.float64
N = 5


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)).to(DT)
    return model, torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))


SCALINGS = {
    "divide_by_float": lambda o: o / 2.5,
    "divide_by_tensor": lambda o: o / torch.tensor(2.5, dtype=DT),
    "divide_by_a_constant_vector": lambda o: o / torch.tensor([1.0, 2.0, 4.0], dtype=DT),
    "multiply_by_constant_tensor": lambda o: o * torch.tensor([0.5, 2.0, 3.0], dtype=DT),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_hessian_through_a_scaling_by_a_constant(scaling: str, reduction: str) -> None:
    """cross_entropy(o / T, y): raised "second derivative of DivBackward0 not known" before."""
    model, x, y = mlp()
    scale = SCALINGS[scaling]

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(scale(out), y, reduction=reduction)

    with extend(model, DiagHessian()):
        loss_fn(model(x), y).backward()
    expected = reference.hessian_diagonal(model, loss_fn, x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.diag_h, expected[k], rtol=1e-10, atol=1e-12)


def test_division_by_a_learned_tensor_still_raises() -> None:
    class LearnedTemperature(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Linear(4, 3)
            self.t = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.body(x) / F.softplus(self.t(x))

    model = LearnedTemperature().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    with pytest.raises(UnsupportedOperationError, match="DivBackward0"), extend(model, DiagHessian()):
        F.cross_entropy(model(x), y).backward()


def called_twice() -> nn.Module:
    shared = nn.Linear(4, 4)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(4, 3)).to(DT)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(t)))


@pytest.mark.parametrize("case", ["called_twice", "tied"])
def test_weight_used_twice_in_a_chain(case: str) -> None:
    """Documented limit (docs/limits.rst): DiagHessian raises, naming the product and the reason; GGN is exact."""
    if case == "called_twice":
        model, x, y = called_twice(), torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    else:
        model, x, y = Tied().to(DT), torch.randint(0, 7, (N,)), torch.randint(0, 7, (N,))
    with pytest.raises(UnsupportedOperationError, match=r"called twice.*tied"), extend(model, DiagHessian()):
        F.cross_entropy(model(x), y).backward()
    with extend(model, DiagGGNExact()):
        F.cross_entropy(model(x), y).backward()
    got = {k: p.diag_ggn_exact for k, p in model.named_parameters()}  # before functional_call rebinds tied weights
    expected = reference.ggn_diagonal(model, F.cross_entropy, x, y)
    for k, value in got.items():
        torch.testing.assert_close(value, expected[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_weight_used_in_parallel_branches(reduction: str) -> None:
    """A module called on two inputs that do not depend on it: no cross term, exact (docs/limits.rst)."""

    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared, self.out = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.shared(x)) * torch.sigmoid(self.shared(x.flip(1))))

    model = Parallel().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction=reduction)

    with extend(model, DiagHessian()):
        loss_fn(model(x), y).backward()
    got = {k: p.diag_h for k, p in model.named_parameters()}
    expected = reference.hessian_diagonal(model, loss_fn, x, y)
    for k, value in got.items():
        torch.testing.assert_close(value, expected[k], rtol=1e-10, atol=1e-12)
