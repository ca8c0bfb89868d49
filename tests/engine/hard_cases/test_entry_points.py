"""torch.autograd.backward / torch.autograd.grad inside extend(), empty batches, wrong dtypes, attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from secorder_hooks import BatchGrad, DiagHessian, ExtensionError, extend
from tests.support import reference
from tests.support.checks import hook_counts

DT = torch.float64
N = 5


def mlp() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    return model, torch.randn(N, 4, dtype=DT), torch.randint(0, 3, (N,))


@pytest.mark.parametrize("form", ["tensor", "list", "grad_tensors"])
def test_autograd_backward_is_loss_backward(form: str) -> None:
    model, x, y = mlp()
    for step in range(2):  # the second step must not keep the first step's values
        x = x + step
        with extend(model, BatchGrad(), DiagHessian()):
            loss = F.cross_entropy(model(x), y)
            if form == "tensor":
                torch.autograd.backward(loss)
            elif form == "list":
                torch.autograd.backward([loss])
            else:
                torch.autograd.backward([loss], grad_tensors=[torch.ones((), dtype=DT)])
        grads = reference.per_example_grads(model, F.cross_entropy, x, y)
        hess = reference.hessian_diagonal(model, F.cross_entropy, x, y)
        for k, p in model.named_parameters():
            torch.testing.assert_close(p.grad_batch, grads[k], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(p.diag_h, hess[k], rtol=1e-10, atol=1e-12)
            p.grad = None


def test_autograd_backward_of_several_losses_raises() -> None:
    model, x, y = mlp()
    with pytest.raises(ExtensionError, match="2 tensors"), extend(model, BatchGrad()):
        out = model(x)
        torch.autograd.backward([F.cross_entropy(out, y), out.square().sum()])


def test_autograd_grad_is_a_documented_no_op() -> None:
    """autograd.grad computes ordinary gradients, attaches nothing, and leaves the records for loss.backward()."""
    model, x, y = mlp()
    params = list(model.parameters())
    expected = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    with extend(model, BatchGrad()):
        loss = F.cross_entropy(model(x), y)
        got = torch.autograd.grad(loss, params, retain_graph=True)
        assert not any(hasattr(p, "grad_batch") for p in params)
        loss.backward()
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e)
    grads = reference.per_example_grads(model, F.cross_entropy, x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, grads[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("quantity", [BatchGrad(), DiagHessian()], ids=str)
def test_empty_batch_raises_a_package_error(quantity) -> None:
    model, x, y = mlp()
    before = hook_counts(model)
    with pytest.raises(ExtensionError, match=r"module '0' \(Linear\).*empty batch"), extend(model, quantity):
        F.cross_entropy(model(x[:0]), y[:0]).backward()
    assert hook_counts(model) == before


def test_integer_input_gives_torchs_own_error() -> None:
    model, x, _ = mlp()
    with pytest.raises(RuntimeError) as outside:
        model(x.long())
    before = hook_counts(model)
    with pytest.raises(RuntimeError) as inside, extend(model, BatchGrad()):
        model(x.long())
    assert type(inside.value) is type(outside.value) and str(inside.value) == str(outside.value)
    assert hook_counts(model) == before


class Attention(nn.Module):
    def __init__(self, fast_path: bool) -> None:
        super().__init__()
        self.attn, self.out = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)
        self.need_weights = not fast_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.attn(x, x, x, need_weights=self.need_weights)[0]).mean(1))


@pytest.mark.parametrize("fast_path", [False, True])
def test_attention_hessian(fast_path: bool) -> None:
    """need_weights=False runs scaled_dot_product_attention (fused kernels without double backward)."""
    model = Attention(fast_path).to(DT)
    x, y = torch.randn(3, 4, 4, dtype=DT), torch.randint(0, 3, (3,))
    with extend(model, DiagHessian()):
        F.cross_entropy(model(x), y).backward()
    with sdpa_kernel(SDPBackend.MATH):  # the reference's forward-over-reverse needs the math kernel
        expected = reference.hessian_diagonal(model, F.cross_entropy, x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.diag_h, expected[k], rtol=1e-9, atol=1e-12)


def test_transformer_encoder_layer_hessian_in_float32() -> None:
    """float32 picks the fused CPU attention kernel, whose backward has no derivative."""
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.randn(3, 3, 4), torch.randint(0, 3, (3,))
    with extend(model, DiagHessian()):
        F.cross_entropy(model(x), y).backward()
    with sdpa_kernel(SDPBackend.MATH):
        expected = reference.hessian_diagonal(model.double(), F.cross_entropy, x.double(), y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.diag_h.double(), expected[k], rtol=1e-3, atol=1e-5)
