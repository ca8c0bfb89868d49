"""The function API (issue 4): bad input raises a clear error before any backward pass."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secorder_hooks import (
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    generalized_fisher_diagonal,
    hessian_diagonal,
    model_hessian_diagonal,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)


class _CountBackward(torch.autograd.Function):
    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        _CountBackward.calls += 1
        return g


class Counted(nn.Module):
    """Linear(4, 3) whose backward passes are counted."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(_CountBackward.apply(x.requires_grad_(True) if not x.requires_grad else x))


MODEL_FUNCTIONS = [
    model_hessian_diagonal,
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    per_layer_hessian_diagonal,
    per_layer_fisher_diagonal,
]
X = torch.randn(5, 4)
Y_CLASS = torch.randint(0, 3, (5,))


@pytest.fixture(autouse=True)
def _reset() -> None:
    _CountBackward.calls = 0
    yield
    assert _CountBackward.calls == 0, "a backward pass ran before the error"


@pytest.mark.parametrize("fn", MODEL_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    ("loss_fn", "x", "y", "error", "match"),
    [
        (nn.CrossEntropyLoss(), X, Y_CLASS[:4], ValueError, r"needs targets \(5,\)"),
        (nn.CrossEntropyLoss(), X[:0], Y_CLASS[:0], ValueError, "empty batch"),
        (nn.CrossEntropyLoss(), X, Y_CLASS.float(), ValueError, "shape"),
        (nn.CrossEntropyLoss(), X, Y_CLASS.bool(), TypeError, "integer"),
        (nn.MSELoss(), X, torch.randn(5), ValueError, "shapes must be equal"),
        (nn.MSELoss(), X, torch.randint(0, 2, (5, 3)), TypeError, "floating"),
        (nn.CrossEntropyLoss(reduction="none"), X, Y_CLASS, ValueError, "scalar"),
    ],
    ids=["batch", "empty", "ce-float-shape", "ce-dtype", "mse-broadcast", "mse-dtype", "not-scalar"],
)
def test_model_functions_reject_bad_input(fn, loss_fn, x, y, error, match) -> None:
    with pytest.raises(error, match=match):
        fn(Counted(), loss_fn, x, y)


def test_hessian_diagonal_bad_input() -> None:
    x = torch.randn(3, requires_grad=True)
    called = []

    def func():
        called.append(1)
        return (x**2).sum()

    with pytest.raises(ValueError, match="not a leaf"):
        hessian_diagonal(func, [x * 2])
    with pytest.raises(ValueError, match="v\\[0\\] has shape"):
        hessian_diagonal(func, [x], v=[torch.ones(4)])
    with pytest.raises(ValueError, match="one tensor per parameter"):
        hessian_diagonal(func, [x], v=[torch.ones(3), torch.ones(3)])
    with pytest.raises(ValueError, match="empty"):
        hessian_diagonal(func, [])
    assert not called
    with pytest.raises(ValueError, match="scalar"):
        hessian_diagonal(lambda: x**2, [x])
    with pytest.raises(TypeError, match="tensor"):
        hessian_diagonal(lambda: 1.0, [x])


def test_generalized_fisher_bad_input() -> None:
    model = Counted()
    out = model(X)
    with pytest.raises(NotImplementedError, match="loss_type"):
        generalized_fisher_diagonal(model, out, Y_CLASS, loss_type="poisson")
    with pytest.raises(NotImplementedError):
        generalized_fisher_diagonal(model, torch.randn(5, requires_grad=True), Y_CLASS, loss_type="nll")
    with pytest.raises(NotImplementedError, match="batch size"):
        generalized_fisher_diagonal(model, out, Y_CLASS[:3])
    with pytest.raises(NotImplementedError, match="floating"):
        generalized_fisher_diagonal(model, out, Y_CLASS, loss_type="mse")
    with pytest.raises(ValueError, match="shape"):  # also a ValueError
        generalized_fisher_diagonal(model, out, torch.randn(5, 2), loss_type="mse")
    with pytest.raises(ValueError, match="do not require grad"):
        generalized_fisher_diagonal(model, out.detach(), Y_CLASS)
    with pytest.raises(ValueError, match="mc_samples"):
        generalized_fisher_diagonal(model, out, Y_CLASS, mc_samples=0)
    with pytest.raises(NotImplementedError, match="reduction"):
        generalized_fisher_diagonal(model, out, Y_CLASS, reduction="none")
