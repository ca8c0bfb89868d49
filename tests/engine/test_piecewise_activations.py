"""Exact Hessian diagonals through the piecewise activations of mobile CNNs, in place or not.

``hardsigmoid``, ``relu6`` / ``hardtanh``, ``hardshrink`` and ``softshrink`` are piecewise
linear (second derivative 0 almost everywhere); ``hardswish`` is piecewise quadratic
(second derivative 1/3 on (-3, 3), else 0); in-place ``elu`` / ``selu`` / ``celu`` save
their result instead of their input. torch has no double backward for ``hardsigmoid``, so
the brute-force reference runs a twin of the model that computes it by
:func:`tests.real_models.hardsigmoid_for_reference` (torch's value and first derivative,
differentiable twice); inputs are checked to lie away from every kink.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import secorder_hooks as sh
from secorder_hooks.engine import curved_ops, hessian_terms
from tests.support import reference
from tests.support.real_models import hardsigmoid_for_reference

HESSIAN = (sh.DiagHessian(), sh.BatchDiagHessian())
KINKS = {"hardswish": (-3.0, 3.0), "hardsigmoid": (-3.0, 3.0), "relu6": (0.0, 6.0), "hardtanh": (-2.0, 2.0)}
KINKS |= {"hardshrink": (-0.5, 0.5), "softshrink": (-0.5, 0.5), "elu": (0.0,), "selu": (0.0,), "celu": (0.0,)}


class Piecewise(nn.Module):
    """Linear layers with every piecewise activation between them: right after a layer (the
    closed forms), after another activation (a chain), a squeeze-excitation-like gate
    ``h * hardsigmoid(gate(h))`` (a product), in place (each on a tensor used nowhere else) and not.

    Args:
        in_place: Use the in-place variants (``inplace=True``) where torch has them.
        reference: Compute ``hardsigmoid`` by ``hardsigmoid_for_reference`` (differentiable twice by torch).
    """

    def __init__(self, in_place: bool, reference: bool = False) -> None:
        super().__init__()
        self.in_place, self.reference = in_place, reference
        self.a, self.b, self.gate, self.c = nn.Linear(3, 8), nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)
        self.seen: dict[str, list[Tensor]] = {}

    def _see(self, kind: str, a: Tensor) -> Tensor:
        self.seen.setdefault(kind, []).append(a.detach().clone())
        return a

    def _hardsigmoid(self, a: Tensor) -> Tensor:
        a = self._see("hardsigmoid", a)
        return hardsigmoid_for_reference(a) if self.reference else F.hardsigmoid(a, inplace=self.in_place)

    def forward(self, x: Tensor) -> Tensor:
        ip = self.in_place
        h = F.hardswish(self._see("hardswish", self.a(x)), inplace=ip)  # right after a layer
        h = F.hardswish(self._see("hardswish", 2 * h - 1), inplace=ip)  # after an activation
        h = h * self._hardsigmoid(self.gate(h))  # gate: both factors depend on a, b's parameters
        h = F.relu6(self._see("relu6", self.b(h) + 3), inplace=ip) + self._hardsigmoid(h - 1)
        h = F.hardtanh(self._see("hardtanh", h - 3.5), -2.0, 2.0, inplace=ip)
        h = F.hardshrink(self._see("hardshrink", h), 0.5) + F.softshrink(self._see("softshrink", h), 0.5)
        h = F.elu(self._see("elu", self.c(h)), inplace=ip)
        h = h + F.selu(self._see("selu", h - 1), inplace=ip) + F.celu(self._see("celu", h + 0.5), 0.7, inplace=ip)
        return self.out(h)


def _model(in_place: bool, reference: bool = False) -> Piecewise:
    torch.manual_seed(0)
    model = Piecewise(in_place, reference).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1.5)  # pre-activations spread over every piece
    return model


def _distance_to_kinks(model: Piecewise) -> float:
    return min(
        (a - kink).abs().min().item() for kind, values in model.seen.items() for a in values for kink in KINKS[kind]
    )


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("in_place", [False, True], ids=["out_of_place", "in_place"])
def test_hessian_through_piecewise_activations(in_place, reduction):
    model, twin = _model(in_place), _model(in_place, reference=True)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))

    def loss_fn(o, t):
        return F.cross_entropy(o, t, reduction=reduction)

    with sh.extend(model, *HESSIAN, sh.DiagGGNExact()):
        loss_fn(model(x), y).backward()
    assert _distance_to_kinks(model) > 1e-6  # both implementations on the same piece
    for kind in ("hardswish", "relu6", "hardtanh"):  # every piece is visited
        values = torch.cat([a.flatten() for a in model.seen[kind]])
        low, high = KINKS[kind]
        assert (values < low).any() and ((values > low) & (values < high)).any() and (values > high).any(), kind
    expected = reference.hessian_diagonal(twin, loss_fn, x, y)
    per_example = reference.per_example_hessian_diagonal(twin, loss_fn, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_h, expected[name], atol=1e-10, rtol=1e-8, msg=name)
        torch.testing.assert_close(p.diag_h_batch, per_example[name], atol=1e-10, rtol=1e-8, msg=name)
    assert any((p.diag_h - p.diag_ggn_exact).abs().max() > 1e-3 for p in model.parameters())  # not the GGN


def test_hardswish_second_derivative_is_torchs():
    """The closed form equals torch's own double backward of hardswish, kinks included."""
    a = torch.tensor([-4.0, -3.0, -2.9, -1.0, 0.0, 2.5, 3.0, 3.1, 7.0], dtype=torch.float64, requires_grad=True)
    node = F.hardswish(a).grad_fn
    (first,) = torch.autograd.grad(F.hardswish(a).sum(), a, create_graph=True)
    (second,) = torch.autograd.grad(first.sum(), a)
    torch.testing.assert_close(curved_ops.second_derivative(node), second, rtol=0, atol=0)


@pytest.mark.parametrize("fn", [lambda a: F.elu(a, 1.3, inplace=True), lambda a: F.selu(a, inplace=True)])
def test_in_place_elu_second_derivative_from_its_result(fn):
    a = torch.linspace(-3, 3, 13, dtype=torch.float64).add(0.05).requires_grad_(True)
    node = fn(a.clone()).grad_fn
    assert curved_ops.node_name(node) == "EluBackward1"
    second = torch.func.vmap(torch.func.grad(torch.func.grad(lambda t: fn(t.clone()))))(a.detach())
    torch.testing.assert_close(curved_ops.second_derivative(node), second)


def test_activation_without_double_backward_is_a_package_error(monkeypatch: pytest.MonkeyPatch):
    """An elementwise op evaluated by autograd that torch cannot differentiate twice: named, with what to do."""

    def no_double_backward(node, a):
        return F.hardsigmoid(a)  # torch: "derivative for aten::hardsigmoid_backward is not implemented"

    second = curved_ops._by_autograd(no_double_backward)
    monkeypatch.setitem(curved_ops.ELEMENTWISE, "SiluBackward0", second)
    model = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    error = r"SiluBackward0.*cannot differentiate it twice.*DiagGGN"
    with pytest.raises(sh.UnsupportedOperationError, match=error), sh.extend(model, sh.DiagHessian()):
        F.cross_entropy(model(x), y).backward()


class SqueezeExcitation(nn.Module):
    """``x * hardsigmoid(fc2(hardswish(fc1(mean(x)))))``: a ``[N, C, 1, 1]`` scale broadcast over ``[N, C, H, W]``,
    both factors depending on the convolution's parameters."""

    def __init__(self, reference: bool = False) -> None:
        super().__init__()
        self.reference = reference
        self.conv, self.fc1, self.fc2 = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.conv(x))
        s = self.fc2(F.hardswish(self.fc1(h.mean((2, 3), keepdim=True))))
        s = hardsigmoid_for_reference(s) if self.reference else F.hardsigmoid(s)
        return self.head((h * s).sum((2, 3)))


@pytest.mark.parametrize("block_bytes", [None, 1], ids=["one_block", "one_column_per_block"])
def test_hessian_through_a_broadcast_product(monkeypatch: pytest.MonkeyPatch, block_bytes):
    """Squeeze-excitation's product term, whole or one column per backward (the memory bound)."""
    if block_bytes is not None:
        monkeypatch.setattr(hessian_terms, "RESIDUAL_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    model = SqueezeExcitation().double()
    twin = SqueezeExcitation(reference=True).double()
    twin.load_state_dict(model.state_dict())
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    with sh.extend(model, *HESSIAN):
        F.cross_entropy(model(x), y).backward()
    expected = reference.hessian_diagonal(twin, F.cross_entropy, x, y)
    per_example = reference.per_example_hessian_diagonal(twin, F.cross_entropy, x, y)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.diag_h, expected[name], atol=1e-10, rtol=1e-8, msg=name)
        torch.testing.assert_close(p.diag_h_batch, per_example[name], atol=1e-10, rtol=1e-8, msg=name)
