r"""The standard benchmark problems (DESIGN.md sec. 4) and two larger architectures.

Each factory returns a :class:`Problem`: a float32 model, a batch ``(x, y)`` and the loss
function as written by a user. The loss is :math:`L = c \sum_n \ell_n(f_n)` with the
reduction factor ``c`` stored on the problem (``1/N`` for cross-entropy mean, ``1/(N C)`` for
MSE mean over ``[N, C]``), so that peers computing at another scale can be converted to ours.

Problems:
    A: MLP 784-512-256-10, ReLU, CrossEntropyLoss(mean), N=128.
    B: CNN on 3x32x32, N=64, two Conv-ReLU-MaxPool stages, Linear(2048, 10), CrossEntropyLoss(mean).
    C: MLP 784-256-256-10, Sigmoid, MSELoss(mean) on 10-d targets, N=128.
    small: MLP 64-64-64-64-10 (four Linear layers), ReLU, CrossEntropyLoss(mean), N=8: so little
        arithmetic (``T0`` about 0.3 ms) that the table shows the engine's fixed cost per step.
    resnet: torchvision-style residual CNN (BatchNorm in eval mode, ``ReLU(inplace=True)``,
        ``out += identity``) on 3x32x32, N=32, CrossEntropyLoss(mean).
    transformer: one pre-norm transformer block (LayerNorm, ``nn.MultiheadAttention`` with
        ``batch_first=True``, GELU MLP) on [N=32, T=16, D=64] inputs, mean-pooled to 10 classes,
        CrossEntropyLoss(mean).
    gpt2: Hugging Face ``GPT2LMHeadModel`` (2 layers, 2 heads, width 32, vocabulary 100,
        SDPA attention) on ``[N=16, T=32]`` token ids, language-model loss over all tokens
        (``cross_entropy(logits.reshape(-1, V), ids.reshape(-1))``, mean over the N*T tokens).
        Needs ``transformers``.
    resnet18: torchvision ``resnet18`` (10 classes, eval mode) on 3x32x32, N=32,
        CrossEntropyLoss(mean). Needs ``torchvision``.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["Problem", "ProblemName", "make_problem", "STANDARD", "OVERHEAD", "ALL", "num_params"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class ProblemName(enum.Enum):
    """Names of the benchmark problems (values are the CLI spellings)."""

    A = "A"
    B = "B"
    C = "C"
    SMALL = "small"
    RESNET = "resnet"
    TRANSFORMER = "transformer"
    GPT2 = "gpt2"
    RESNET18 = "resnet18"


STANDARD = (ProblemName.A, ProblemName.B, ProblemName.C)
OVERHEAD = ProblemName.SMALL
"""The problem whose time is mostly the engine's fixed cost per step (issue 12), in the table beside A, B, C."""
REAL_MODELS = (ProblemName.GPT2, ProblemName.RESNET18)
"""Problems built from other libraries' models (optional packages); not in the default run."""
ALL = tuple(name for name in ProblemName if name not in REAL_MODELS and name is not OVERHEAD)
"""The default problems of ``compare.py`` (``small`` is a table row; ``--problems small`` compares peers on it)."""


@dataclass
class Problem:
    r"""One benchmark problem.

    Attributes:
        name: Which problem.
        model: The float32 model (in eval mode where it has BatchNorm).
        inputs: ``x``, examples along dim 0 (``N`` of them).
        targets: ``y`` for ``loss_fn``.
        loss_fn: The loss as a user writes it (mean reduction).
        loss_fn_sum: The same loss with ``reduction="sum"`` (for peers that want it).
        reduction_factor: ``c`` in :math:`L = c \sum_n \ell_n`.
        classification: Whether the loss is cross-entropy over class indices.
    """

    name: ProblemName
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_fn: LossFn
    loss_fn_sum: LossFn
    reduction_factor: float
    classification: bool

    @property
    def batch_size(self) -> int:
        """``N``."""
        return self.inputs.shape[0]

    def loss(self, model: nn.Module | None = None) -> Tensor:
        """Forward pass and loss ``L`` of ``model`` (default: the problem's model)."""
        return self.loss_fn((model or self.model)(self.inputs), self.targets)


def num_params(model: nn.Module) -> int:
    """``D``: number of trainable parameter entries."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _mlp(widths: tuple[int, ...], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def _cnn_b() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2048, 10),
    )


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: in-place ReLU and ``out += identity``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + x)``, shape preserved."""
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class SmallResNet(nn.Module):
    """Stem conv-BN-ReLU, two basic blocks, global average pooling, linear head."""

    def __init__(self, channels: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(inplace=True)
        )
        self.blocks = nn.Sequential(BasicBlock(channels), BasicBlock(channels))
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W] -> [N, classes]``."""
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``; mean-pooled head."""

    def __init__(self, dim: int = 64, heads: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        """``[N, T, dim] -> [N, classes]``."""
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.mlp(self.ln2(x))
        return self.head(x.mean(dim=1))


class LanguageModelLoss(nn.Module):
    """Cross-entropy over all tokens of ``[N, T, V]`` logits and ``[N, T]`` labels."""

    def __init__(self, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = reduction

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=self.reduction
        )


class Logits(nn.Module):
    """A Hugging Face model called on token ids, returning its ``logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids=input_ids).logits


def _gpt2(vocab: int) -> nn.Module:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.real_models import import_transformers  # the torchvision import shim, where needed

    transformers = import_transformers()
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0,
    )  # fmt: skip
    return Logits(transformers.GPT2LMHeadModel(config))


def _resnet18(classes: int) -> nn.Module:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.real_models import import_torchvision

    return import_torchvision().models.resnet18(num_classes=classes)


def _initialize(model: nn.Module) -> None:
    """Give BatchNorm non-trivial running statistics and affine parameters, then eval()."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()


def make_problem(name: ProblemName | str, dtype: torch.dtype = torch.float32, seed: int = 0) -> Problem:
    """Build a problem deterministically (``torch.manual_seed(seed)``).

    Args:
        name: The problem (or its CLI spelling, e.g. ``"A"``).
        dtype: Floating point type of the model and inputs.
        seed: Seed for parameters and data.

    Returns:
        The problem; every call returns an equal, independent copy.
    """
    name = ProblemName(name)
    torch.manual_seed(seed)
    classes = 10
    ce, ce_sum = nn.CrossEntropyLoss(), nn.CrossEntropyLoss(reduction="sum")
    if name == ProblemName.A:
        model, x = _mlp((784, 512, 256, classes), nn.ReLU), torch.randn(128, 784)
    elif name == ProblemName.B:
        model, x = _cnn_b(), torch.randn(64, 3, 32, 32)
    elif name == ProblemName.C:
        model, x = _mlp((784, 256, 256, classes), nn.Sigmoid), torch.randn(128, 784)
    elif name == ProblemName.SMALL:
        model, x = _mlp((64, 64, 64, 64, classes), nn.ReLU), torch.randn(8, 64)
    elif name == ProblemName.RESNET:
        model, x = SmallResNet(classes=classes), torch.randn(32, 3, 32, 32)
    elif name == ProblemName.TRANSFORMER:
        model, x = TransformerBlock(classes=classes), torch.randn(32, 16, 64)
    elif name == ProblemName.GPT2:
        vocab = 100
        model, x = _gpt2(vocab), torch.randint(0, vocab, (16, 32))
    else:
        model, x = _resnet18(classes), torch.randn(32, 3, 32, 32)
    _initialize(model)
    n = x.shape[0]
    if name == ProblemName.GPT2:
        loss_fn, loss_fn_sum, factor = LanguageModelLoss(), LanguageModelLoss("sum"), 1.0 / x.numel()
        return Problem(name, model.to(dtype), x, x.clone(), loss_fn, loss_fn_sum, factor, classification=True)
    if name == ProblemName.C:
        y = torch.randn(n, classes, dtype=dtype)
        loss_fn, loss_fn_sum, factor = nn.MSELoss(), nn.MSELoss(reduction="sum"), 1.0 / (n * classes)
    else:
        y = torch.randint(0, classes, (n,))
        loss_fn, loss_fn_sum, factor = ce, ce_sum, 1.0 / n
    return Problem(
        name=name,
        model=model.to(dtype),
        inputs=x.to(dtype),
        targets=y,
        loss_fn=loss_fn,
        loss_fn_sum=loss_fn_sum,
        reduction_factor=factor,
        classification=name != ProblemName.C,
    )
