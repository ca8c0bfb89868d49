"""The generic torch.func rule and the public rule checker."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secorder_hooks import BatchGrad, DiagGGNExact, DiagHessian, LayerRule, SumGradSquared, check_rule, extend
from secorder_hooks.rules import rule_for
from secorder_hooks.rules.generic import GENERIC_RULE, GenericRule
from secorder_hooks.rules.inputs import CallInputs
from secorder_hooks.rules.layout import batch_layout_for
from secorder_hooks.rules.linear import LinearRule
from tests.support import reference

pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


class FunctionalLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class Custom(nn.Module):
    """Keyword and non-tensor arguments, a shared tensor, two outputs, curved in its parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4))
        self.scale = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor, table: Tensor, *, mode: str = "tanh", offset: Tensor | None = None):
        h = F.linear(x, self.weight) + table
        h = torch.tanh(h) if mode == "tanh" else h
        out = h * self.scale.exp()
        return out + (0 if offset is None else offset), {"total": out.sum(-1)}


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape)


CASES = {
    "linear_generic": (nn.Linear(3, 2), (_x(4, 3),), {}),
    "functional_linear": (FunctionalLinear(), (_x(4, 3),), {}),
    "bilinear": (nn.Bilinear(3, 2, 2), (_x(4, 3), _x(4, 2)), {}),
    "prelu_shared": (nn.PReLU(init=0.2), (_x(4, 3, 2),), {}),
    "prelu_channels": (nn.PReLU(3, init=0.2), (_x(4, 3, 2),), {}),
    "conv_transpose": (nn.ConvTranspose2d(2, 3, 2, stride=2), (_x(3, 2, 2, 2),), {}),
    "mha_seq_first": (nn.MultiheadAttention(4, 2), (_x(3, 2, 4),) * 3, {}),
    "mha_batch_first": (nn.MultiheadAttention(4, 2, batch_first=True), (_x(2, 3, 4), _x(2, 5, 4), _x(2, 5, 4)), {}),
    "mha_masks": (
        nn.MultiheadAttention(4, 2, kdim=3, vdim=5),
        (_x(3, 2, 4), _x(4, 2, 3), _x(4, 2, 5)),
        {"key_padding_mask": torch.tensor([[False] * 4, [False, False, True, True]]), "need_weights": False},
    ),
    "rnn": (nn.RNN(3, 2, num_layers=2), (_x(4, 2, 3),), {}),
    "gru_batch_first": (nn.GRU(3, 2, batch_first=True), (_x(2, 4, 3), _x(1, 2, 2)), {}),
    "lstm_hx": (nn.LSTM(2, 3), (_x(3, 2, 2), (_x(1, 2, 3), _x(1, 2, 3))), {}),
    "custom_kwargs": (Custom(), (_x(4, 4), _x(3)), {"mode": "tanh", "offset": _x(4, 3)}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_generic_rule_is_exact(name: str) -> None:
    module, args, kwargs = CASES[name]
    check_rule(module, args, GENERIC_RULE if not isinstance(module, nn.MultiheadAttention) else None, kwargs=kwargs)


def test_mha_rule_covers_out_proj_and_has_a_curved_own_term() -> None:
    mha = nn.MultiheadAttention(4, 2).double()
    rule = rule_for(mha)
    assert isinstance(rule, GenericRule)
    assert {"in_proj_weight", "out_proj.weight", "out_proj.bias"} <= set(rule.parameters(mha))
    q = torch.randn(3, 2, 4, dtype=torch.float64)
    g = torch.randn(3, 2, 4, dtype=torch.float64)
    own = rule.own_hessian_term(mha, CallInputs((q, q, q), {}, (0,)), g, per_example=True)
    assert own["in_proj_weight"].shape == (2, 12, 4)
    assert own["in_proj_weight"].abs().max() > 1e-3  # attention is not affine in its projections
    assert own["out_proj.weight"].abs().max() == 0  # the output projection is


def test_per_example_grads_shapes_with_tuple_outputs_and_batch_axis_one() -> None:
    lstm = nn.LSTM(2, 3).double()
    x = torch.randn(5, 4, 2, dtype=torch.float64)
    out, (h, c) = lstm(x)
    grads = (torch.randn(2, *out.shape).double(), torch.randn(2, *h.shape).double(), torch.randn(2, *c.shape).double())
    result = GENERIC_RULE.per_example_grads(lstm, CallInputs((x,), {}, (0, 1, 2)), grads)
    assert result["weight_ih_l0"].shape == (2, 4, 12, 2)
    assert batch_layout_for(lstm).example_count(lstm, CallInputs((x,), {}, (0, 1, 2)), [out.shape]) == 4


class ScaledTwice(LayerRule):
    """A wrong rule: per-example gradients scaled by 2."""

    def per_example_grads(self, module, inputs, grad_output):
        return {k: 2 * v for k, v in LinearRule().per_example_grads(module, inputs, grad_output).items()}


class ClaimsAffine(GenericRule):
    """A wrong rule for attention: exact gradients, but claims a zero own-Hessian term."""

    def own_hessian_term(self, module, inputs, grad_output, per_example):
        return {}


class DropsBias(LayerRule):
    def per_example_grads(self, module, inputs, grad_output):
        return {"weight": LinearRule().per_example_grads(module, inputs, grad_output)["weight"]}


def test_check_rule_accepts_builtin_linear_rule() -> None:
    check_rule(nn.Linear(3, 2), torch.randn(5, 3))
    check_rule(nn.Linear(3, 2), torch.randn(5, 2, 3))


@pytest.mark.parametrize(
    ("module", "args", "rule", "match"),
    [
        (nn.Linear(3, 2), (torch.randn(4, 3),), ScaledTwice(), r"per_example_grads of parameter 'weight'.*max abs"),
        (nn.Linear(3, 2), (torch.randn(4, 3),), DropsBias(), r"returned parameters \['weight'\].*'bias'"),
        (
            nn.MultiheadAttention(4, 2),
            (torch.randn(3, 2, 4),) * 3,
            ClaimsAffine(children=("out_proj",)),
            r"own_hessian_term\(per_example=False\) of parameter 'in_proj_weight'",
        ),
    ],
    ids=["scaled", "missing_param", "wrong_affine_claim"],
)
def test_check_rule_rejects_wrong_rules(module: nn.Module, args: tuple, rule: LayerRule, match: str) -> None:
    with pytest.raises(AssertionError, match=match):
        check_rule(module, args, rule)


def test_check_rule_leaves_module_unchanged() -> None:
    lin = nn.Linear(3, 2)
    before = copy.deepcopy(lin.state_dict())
    check_rule(lin, torch.randn(4, 3))
    assert lin.weight.dtype == torch.float32
    for k, v in lin.state_dict().items():
        assert torch.equal(v, before[k])


class LSTMClassifier(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.lstm = nn.LSTM(3, 4, batch_first=batch_first)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, T, 3]
        out, _ = self.lstm(x if self.batch_first else x.transpose(0, 1))
        last = out[:, -1] if self.batch_first else out[-1]
        return self.head(last)


@pytest.mark.parametrize("batch_first", [True, False])
def test_extend_with_recurrent_module(batch_first: bool) -> None:
    """End to end through the engine; reference by one masked backward per example (vmap cannot run LSTM)."""
    model = LSTMClassifier(batch_first).double()
    x, y = torch.randn(3, 5, 3, dtype=torch.float64), torch.tensor([0, 1, 1])
    with extend(model, BatchGrad(), SumGradSquared()):
        F.cross_entropy(model(x), y).backward()
    ref = copy.deepcopy(model)
    out0 = ref(x).detach()
    for n in range(3):
        ref.zero_grad()
        mask = (torch.arange(3) == n).unsqueeze(1)
        F.cross_entropy(torch.where(mask, ref(x), out0), y).backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad_batch[n], q.grad, msg=name)
    for p in model.parameters():
        torch.testing.assert_close(p.sum_grad_squared, p.grad_batch.square().sum(0))


class LastStep(nn.Module):
    """A recurrent layer (generic rule) read at the last time step by a linear head."""

    def __init__(self, recurrent: type[nn.RNNBase]) -> None:
        super().__init__()
        self.recurrent = recurrent(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:  # x: [N, T, 3]
        return self.head(self.recurrent(x)[0][:, -1])


@pytest.mark.parametrize("recurrent", [nn.RNN, nn.LSTM, nn.GRU], ids=lambda c: c.__name__)
def test_recurrent_modules_in_float32_and_float64(recurrent: type[nn.RNNBase]) -> None:
    """Every quantity in both dtypes against float64 brute force (float32 LSTM used to fail in oneDNN)."""
    torch.manual_seed(0)
    model64 = LastStep(recurrent).double()
    x, y = torch.randn(5, 6, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    grads = reference.per_example_grads(model64, loss_fn, x, y)
    want = {
        "grad_batch": grads,
        "sum_grad_squared": {k: g.square().sum(0) for k, g in grads.items()},
        "diag_ggn_exact": reference.ggn_diagonal(model64, loss_fn, x, y),
        "diag_h": reference.hessian_diagonal(model64, loss_fn, x, y),
    }
    for dtype, tol in ((torch.float64, {"atol": 1e-12, "rtol": 1e-9}), (torch.float32, {"atol": 1e-6, "rtol": 1e-4})):
        model = copy.deepcopy(model64).to(dtype)
        with extend(model, BatchGrad(), SumGradSquared(), DiagGGNExact(), DiagHessian()):
            loss_fn(model(x.to(dtype)), y).backward()
        for name, p in model.named_parameters():
            for attribute, values in want.items():
                got = getattr(p, attribute)
                assert got.dtype == dtype
                torch.testing.assert_close(got.double(), values[name], **tol, msg=f"{dtype} {attribute} {name}")


class ForgetsWeights(LinearRule):
    """A typical bug: the curvature weights [V, N] are ignored."""

    def weighted_squared_sum(self, module, inputs, grad_output, weights, per_example):
        return super().weighted_squared_sum(module, inputs, grad_output, None, per_example)


class ScaledTwiceWithRepr(ScaledTwice):
    def __repr__(self) -> str:
        return "ScaledTwice(factor=2)"


@pytest.mark.parametrize(
    ("rule", "name"),
    [(ForgetsWeights(), "ForgetsWeights"), (ScaledTwiceWithRepr(), "ScaledTwice(factor=2)")],
    ids=["class_name", "own_repr"],
)
def test_check_rule_message_names_the_rule(rule: LayerRule, name: str) -> None:
    with pytest.raises(AssertionError) as info:
        check_rule(nn.Linear(3, 2), torch.randn(4, 3), rule)
    assert str(info.value).startswith(f"{name} on Linear: ")
    assert " object at 0x" not in str(info.value)


def test_recurrent_modules_run_without_torch_notices() -> None:
    """As users see it (a fresh interpreter): disabling oneDNN for an LSTM prints no torch notice."""
    import os
    import subprocess
    import sys

    program = (
        "import torch\n"
        "from torch import nn\n"
        "from secorder_hooks import extend, BatchGrad\n"
        "lstm, head = nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 2)\n"
        "model = nn.ModuleDict({'lstm': lstm, 'head': head})\n"
        "x, y = torch.randn(5, 6, 3), torch.randint(0, 2, (5,))\n"
        "with extend(model, BatchGrad()):\n"
        "    nn.functional.cross_entropy(head(lstm(x)[0][:, -1]), y).backward()\n"
        "print(lstm.weight_ih_l0.grad_batch.shape)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    run = subprocess.run(
        [sys.executable, "-c", program],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout
    assert run.stdout.strip() == "torch.Size([5, 16, 3])", run.stdout
