"""Operations that mix the examples of a batch raise; per-example-only look-alikes stay exact."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import secorder_hooks as sh
from secorder_hooks import BatchGrad, DiagGGNExact, DiagHessian, SumGradSquared, UnsupportedOperationError, extend
from tests.support import reference

DT = torch.float64
N = 6


class Mixing(nn.Module):
    """Linear - (a batch statistic) - tanh - Linear."""

    def __init__(self, mix: str) -> None:
        super().__init__()
        self.mix = mix
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.l1(x)
        if self.mix == "batch_norm":
            h = F.batch_norm(h, None, None, training=True)
        elif self.mix == "centering":
            h = h - h.mean(0)
        elif self.mix == "softmax0":
            h = torch.softmax(h, 0)
        elif self.mix == "std0":
            h = h / h.std(0, keepdim=True)
        elif self.mix == "centering_negative_dim":  # dim -2 of [N, 5] is dim 0
            h = h - h.mean(-2, keepdim=True)
        return self.l2(torch.tanh(h))


MIXES = {"batch_norm": "NativeBatchNormBackward0", "centering": "MeanBackward1", "softmax0": "SoftmaxBackward0"}
MIXES["std0"] = "StdBackward0"
MIXES["centering_negative_dim"] = "MeanBackward1"


@pytest.mark.parametrize("quantity", [BatchGrad(), SumGradSquared(), DiagGGNExact(), DiagHessian()], ids=str)
@pytest.mark.parametrize("mix", list(MIXES))
def test_batch_statistic_between_layers_raises(mix: str, quantity: sh.quantities.Quantity) -> None:
    model = Mixing(mix).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    with pytest.raises(UnsupportedOperationError, match=rf"{MIXES[mix]}.*mixes the examples"), extend(model, quantity):
        F.cross_entropy(model(x), y).backward()
    # raised before the ordinary backward: nothing computed, nothing attached
    assert all(p.grad is None and not hasattr(p, quantity.attribute) for p in model.parameters())


class OwnBatchNorm(nn.Module):
    """A custom module with parameters and a functional batch norm in its forward (generic rule)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 4))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x @ self.weight.T, None, None, training=True)


@pytest.mark.parametrize("quantity", [BatchGrad(), DiagGGNExact()], ids=str)
def test_batch_statistic_inside_a_generic_module_raises(quantity: sh.quantities.Quantity) -> None:
    """Was torch's ValueError 'Expected more than 1 value per channel' from the per-example rule."""
    model = nn.Sequential(OwnBatchNorm(), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    match = r"NativeBatchNormBackward0.*inside module '0'"
    with pytest.raises(UnsupportedOperationError, match=match), extend(model, quantity):
        F.cross_entropy(model(x), y).backward()


def test_remedy_in_the_message_is_exact() -> None:
    """The message points to secorder_hooks.hessian_diagonal: exact for the batch loss."""
    model = Mixing("batch_norm").to(DT)
    x, y = torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))
    params = list(model.parameters())
    diag = sh.hessian_diagonal(lambda: F.cross_entropy(model(x), y), params)
    expected = reference.hessian_diagonal(model, F.cross_entropy, x, y)
    for (name, _), d in zip(model.named_parameters(), diag):
        torch.testing.assert_close(d, expected[name], rtol=1e-10, atol=1e-12)


class TimeMajor(nn.Module):
    """Per-example model whose graph has a mean over dim 0 of a time-major tensor (not a batch statistic)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, T, 4]
        h = torch.tanh(self.l1(x)).transpose(0, 1)  # [T, N, 5]
        return self.l2(h.mean(0) + h.softmax(0).sum(0))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_over_a_time_axis_on_dim0_is_not_mixing(reduction: str) -> None:
    model = TimeMajor().to(DT)
    x, y = torch.randn(N, 7, 4, dtype=DT), torch.randint(0, 3, (N,))

    def loss_fn(out: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(out, y, reduction=reduction)

    with extend(model, BatchGrad(), DiagGGNExact()):
        loss_fn(model(x), y).backward()
    grads = reference.per_example_grads(model, loss_fn, x, y)
    ggn = reference.ggn_diagonal(model, loss_fn, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, grads[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.diag_ggn_exact, ggn[name], rtol=1e-10, atol=1e-12)


def test_statistic_of_the_loss_itself_is_not_mixing() -> None:
    """A custom loss averaging over the batch (above the model output) is the loss's own reduction."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, target = torch.randn(N, 4, dtype=DT), torch.randn(N, 3, dtype=DT)

    def loss_fn(out: Tensor, t: Tensor) -> Tensor:
        return ((out - t) ** 2).sum(1).mean(0)

    with extend(model, BatchGrad(), DiagHessian()):
        loss_fn(model(x), target).backward()
    grads = reference.per_example_grads(model, loss_fn, x, target)
    hess = reference.hessian_diagonal(model, loss_fn, x, target)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, grads[name], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.diag_h, hess[name], rtol=1e-10, atol=1e-12)
