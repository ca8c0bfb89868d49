"""DiagHessian through scalings by constants and with a weight used twice in a chain (float64, torch.func)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secorder_hooks import BatchDiagHessian, DiagGGNExact, DiagHessian, UnsupportedOperationError, extend
from tests.support import reference

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


def called_twice(bias: bool = True) -> nn.Module:
    shared = nn.Linear(4, 4, bias=bias)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Sigmoid(), shared, nn.Tanh(), nn.Linear(4, 3)).to(DT)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.out = nn.Embedding(7, 4), nn.Linear(4, 7, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(t)))


class HandwrittenReuse(nn.Module):
    """``h = a @ W`` (not transposed) with ``a`` depending on ``W``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) / 2)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(torch.tanh(x @ self.w) @ self.w))


REUSES = {
    "called_twice": lambda: (called_twice(), torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))),
    "called_twice_no_bias": lambda: (called_twice(False), torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))),
    "tied": lambda: (Tied().to(DT), torch.randint(0, 7, (N,)), torch.randint(0, 7, (N,))),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", list(REUSES))
def test_weight_used_twice_in_a_chain(case: str, reduction: str) -> None:
    """A module called thrice in a chain, weights tied between Embedding and output Linear: exact Hessian.

    Raised "two factors of this product depend on it" before; the cross term of the matrix
    product between the two uses of the weight is now computed.
    """
    model, x, y = REUSES[case]()

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction=reduction)

    with extend(model, DiagHessian(), BatchDiagHessian(), DiagGGNExact()):
        loss_fn(model(x), y).backward()
    # read before functional_call in the references rebinds shared weights
    got = {k: (p.diag_h, p.diag_h_batch, p.diag_ggn_exact) for k, p in model.named_parameters()}
    hess = reference.hessian_diagonal(model, loss_fn, x, y)
    per_example = reference.per_example_hessian_diagonal(model, loss_fn, x, y)
    ggn = reference.ggn_diagonal(model, loss_fn, x, y)
    for k, (h, h_batch, g) in got.items():
        torch.testing.assert_close(h, hess[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(h_batch, per_example[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(g, ggn[k], rtol=1e-10, atol=1e-12)


def test_reused_weight_without_transpose() -> None:
    model = HandwrittenReuse().to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    with extend(model, DiagHessian()):
        F.cross_entropy(model(x), y).backward()
    got = {k: p.diag_h for k, p in model.named_parameters()}
    expected = reference.hessian_diagonal(model, F.cross_entropy, x, y)
    for k, value in got.items():
        torch.testing.assert_close(value, expected[k], rtol=1e-10, atol=1e-12)


def test_reused_weight_on_sequence_inputs_raises() -> None:
    """Documented limit: positions fold into the rows of the product, which are then not the examples."""
    model = called_twice()
    x, y = torch.randn(N, 2, 4, dtype=DT), torch.randint(0, 3, (N, 2))
    with pytest.raises(UnsupportedOperationError, match="dim 0 is not the"), extend(model, DiagHessian()):
        F.cross_entropy(model(x).transpose(1, 2), y).backward()


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
