"""A zoo of tiny test models covering the graph structures the engine must handle.

Each factory returns a :class:`Case` in float32 (call ``case.to(torch.float64)`` for a
float64 copy). Models are small so that float64 brute force (``tests/reference.py``) is
fast. ``ZOO`` maps names to factories; ``GENERIC`` lists the cases built around modules
that only the generic torch.func rule handles.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

N = 4  # examples per batch


@dataclass
class Case:
    """A model, a batch and a loss.

    Attributes:
        name: Identifier used in test ids.
        model: The model (float32 unless converted).
        x: Input batch, examples along dim 0.
        y: Targets.
        loss: ``reduction -> loss module`` (``"mean"`` or ``"sum"``).
    """

    name: str
    model: nn.Module
    x: Tensor
    y: Tensor
    loss: Callable[[str], nn.Module]

    def to(self, dtype: torch.dtype) -> Case:
        """A deep copy with the model and floating-point tensors in ``dtype``."""
        y = self.y.to(dtype) if self.y.is_floating_point() else self.y
        return Case(self.name, copy.deepcopy(self.model).to(dtype), self.x.to(dtype), y, self.loss)

    def loss_fn(self, reduction: str = "mean") -> nn.Module:
        return self.loss(reduction)

    def trainable(self) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.model.named_parameters() if p.requires_grad}


def _ce(reduction: str) -> nn.Module:
    return nn.CrossEntropyLoss(reduction=reduction)


def _mse(reduction: str) -> nn.Module:
    return nn.MSELoss(reduction=reduction)


def _classification(name: str, model: nn.Module, x: Tensor, classes: int) -> Case:
    return Case(name, model, x, torch.randint(0, classes, (x.shape[0],)), _ce)


def _regression(name: str, model: nn.Module, x: Tensor) -> Case:
    with torch.no_grad():
        out = model(x)
    return Case(name, model, x, torch.randn_like(out), _mse)


# ----------------------------------------------------------------------------- MLPs
def mlp(activation: str = "relu") -> Case:
    """Linear(6, 5) - activation - Linear(5, 3); cross-entropy for relu/tanh, MSE for sigmoid/gelu."""
    act = {"relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "gelu": nn.GELU()}[activation]
    model = nn.Sequential(nn.Linear(6, 5), act, nn.Linear(5, 3))
    x = torch.randn(N, 6)
    if activation in ("relu", "tanh"):
        return _classification(f"mlp_{activation}", model, x, 3)
    return _regression(f"mlp_{activation}", model, x)


def deep_mlp() -> Case:
    """Three Linear layers with tanh and sigmoid (curved ops between several layers)."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 3))
    return _classification("deep_mlp", model, torch.randn(N, 5), 3)


# ----------------------------------------------------------------------------- CNN / ResNet
def cnn() -> Case:
    """Conv-ReLU-MaxPool-Conv-ReLU-AvgPool-Flatten-Linear on [N, 2, 4, 4]."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    return _classification("cnn", model, torch.randn(N, 2, 4, 4), 3)


class BasicBlock(nn.Module):
    """torchvision-style residual block: in-place ReLU and ``out += identity``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.block = BasicBlock(3)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block(self.stem(x))
        return self.head(h.mean((2, 3)))


def resnet_block() -> Case:
    """Conv stem, a BasicBlock with BatchNorm in eval mode (random running stats), mean-pool, Linear."""
    model = TinyResNet()
    for bn in (model.block.bn1, model.block.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
        nn.init.uniform_(bn.bias, -0.5, 0.5)
    model.eval()
    return _classification("resnet_block", model, torch.randn(N, 2, 4, 4), 3)


# ----------------------------------------------------------------------------- graph structure
class Functional(nn.Module):
    """F.relu, torch.cat with the input, a view, chunk and a tanh between parameterized layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(10, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.a(x))
        left, right = h.chunk(2, dim=1)
        h = torch.cat([torch.tanh(left), right, x], dim=1).view(x.shape[0], 2, 5).reshape(x.shape[0], 10)
        return self.b(h)


def functional() -> Case:
    return _classification("functional", Functional(), torch.randn(N, 4), 3)


class CalledTwice(nn.Module):
    """One Linear applied twice (same parameters, two calls) and a pair of modules with tied weights."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.enc = nn.Linear(4, 3, bias=False)
        self.dec = nn.Linear(3, 4)
        self.dec2 = nn.Linear(4, 3, bias=False)
        self.dec2.weight = self.enc.weight  # tied: two modules own one parameter
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(torch.tanh(self.shared(x))))
        h = self.dec(torch.sigmoid(self.enc(h)))
        return self.head(torch.tanh(self.dec2(h)))


def called_twice() -> Case:
    return _classification("called_twice", CalledTwice(), torch.randn(N, 4), 2)


class SequenceModel(nn.Module):
    """[N, T, D] -> LayerNorm(D) -> Linear(D, H) -> tanh -> Linear(H, C): per-position layers, examples on dim 0."""

    def __init__(self, d: int = 4, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.a = nn.Linear(d, hidden)
        self.b = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(self.norm(x))))


def sequence() -> Case:
    """Sequence model with MSE on [N, T, C] outputs (positions are not examples)."""
    model = SequenceModel()
    with torch.no_grad():
        nn.init.uniform_(model.norm.weight, 0.5, 1.5)
        nn.init.uniform_(model.norm.bias, -0.5, 0.5)
    return _regression("sequence", model, torch.randn(N, 3, 4))


def frozen() -> Case:
    """Linear-ReLU-Linear-Tanh-Linear with the middle layer frozen (requires_grad=False)."""
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
    model[2].requires_grad_(False)
    return _classification("frozen", model, torch.randn(N, 5), 3)


# ----------------------------------------------------------------------------- generic-rule modules
class Attention(nn.Module):
    """[N, T, E] -> MultiheadAttention (either layout) -> mean over T -> Linear."""

    def __init__(self, batch_first: bool, e: int = 4) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(e, 2, batch_first=batch_first)
        self.head = nn.Linear(e, 3)

    def forward(self, x: Tensor) -> Tensor:
        q = x if self.batch_first else x.transpose(0, 1)
        out, weights = self.attn(q, q, q, need_weights=True)
        out = out if self.batch_first else out.transpose(0, 1)
        return self.head(out.mean(1) + weights.sum((1, 2)).unsqueeze(-1) * 0.1)


def attention(batch_first: bool = True) -> Case:
    return _classification(f"mha_batch_first_{batch_first}", Attention(batch_first), torch.randn(N, 3, 4), 3)


class BilinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.bil = nn.Bilinear(4, 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.bil(x, torch.tanh(self.a(x)))


def bilinear() -> Case:
    return _classification("bilinear", BilinearModel(), torch.randn(N, 4), 3)


def prelu() -> Case:
    """Linear - PReLU(per channel) - Linear."""
    model = nn.Sequential(nn.Linear(4, 5), nn.PReLU(5, init=0.3), nn.Linear(5, 3))
    return _regression("prelu", model, torch.randn(N, 4))


class FunctionalLinear(nn.Module):
    """A user module computing ``F.linear(x, self.weight) + self.bias`` (no registered rule)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5)
        self.bias = nn.Parameter(torch.randn(d_out) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight) + self.bias


def functional_linear() -> Case:
    model = nn.Sequential(FunctionalLinear(4, 5), nn.Sigmoid(), FunctionalLinear(5, 3))
    return _classification("functional_linear", model, torch.randn(N, 4), 3)


ZOO: dict[str, Callable[[], Case]] = {
    "mlp_relu": lambda: mlp("relu"),
    "mlp_sigmoid": lambda: mlp("sigmoid"),
    "mlp_tanh": lambda: mlp("tanh"),
    "mlp_gelu": lambda: mlp("gelu"),
    "deep_mlp": deep_mlp,
    "cnn": cnn,
    "resnet_block": resnet_block,
    "functional": functional,
    "called_twice": called_twice,
    "sequence": sequence,
    "frozen": frozen,
    "mha_batch_first_True": lambda: attention(True),
    "mha_batch_first_False": lambda: attention(False),
    "bilinear": bilinear,
    "prelu": prelu,
    "functional_linear": functional_linear,
}

GENERIC = ["mha_batch_first_True", "mha_batch_first_False", "bilinear", "prelu", "functional_linear"]


def make(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Case:
    """Build zoo case ``name`` deterministically (seeded) in ``dtype``."""
    torch.manual_seed(seed)
    return ZOO[name]().to(dtype)
