"""Real models from their libraries' own constructors (random weights, nothing downloaded), tiny configs.

``transformers`` and ``torchvision`` are optional test dependencies: the builders skip
the calling test when a package is missing (:func:`import_transformers`,
:func:`import_torchvision`).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.support.torchvision_cpu import load_torchvision


# ----------------------------------------------------------------------------- optional packages
def import_torchvision() -> ModuleType:
    """``torchvision`` (:func:`tests.support.torchvision_cpu.load_torchvision`), or skip the test without it."""
    torchvision = load_torchvision()
    if torchvision is None:
        pytest.skip("torchvision is not installed")
    return torchvision


def import_transformers() -> ModuleType:
    """``transformers``, or skip the test where it is not installed."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed")
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()  # transformers imports torchvision where it is installed
    transformers = importlib.import_module("transformers")
    transformers.utils.logging.set_verbosity_error()
    return transformers


# ----------------------------------------------------------------------------- references
HARDSIGMOID_SLOPE = float(torch.tensor(1 / 6, dtype=torch.float32))
"""The slope torch's ``hardsigmoid`` backward uses in every dtype: the float32 value of 1/6
(0.1666666716...), so in float64 its gradient is 3e-8 (relative) off the exact 1/6."""


def hardsigmoid_for_reference(a: Tensor) -> Tensor:
    """``F.hardsigmoid(a)`` with torch's own first derivative, which autograd can differentiate twice.

    torch has no double backward for ``hardsigmoid`` (nor forward-mode derivative of its
    backward), so the brute-force Hessians cannot run through it. This has the same value
    and the same first derivative as torch's (:data:`HARDSIGMOID_SLOPE` on :math:`(-3, 3)`,
    0 elsewhere) and, the slope being piecewise constant, second derivative 0.
    """
    slope = torch.where((a > -3) & (a < 3), HARDSIGMOID_SLOPE, 0.0).to(a.dtype).detach()
    return F.hardsigmoid(a.detach()) + (a - a.detach()) * slope


class ReferenceHardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` computed by :func:`hardsigmoid_for_reference` (never in place)."""

    def forward(self, a: Tensor) -> Tensor:
        return hardsigmoid_for_reference(a)


def reference_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (same parameter names, values, ``requires_grad``) whose
    ``nn.Hardsigmoid`` modules are :class:`ReferenceHardsigmoid`; ``model`` itself if it has none."""
    if not any(isinstance(m, nn.Hardsigmoid) for m in model.modules()):
        return model
    twin = copy.deepcopy(model)
    for name, module in list(twin.named_modules()):
        if isinstance(module, nn.Hardsigmoid):
            parent, _, attribute = name.rpartition(".")
            setattr(twin.get_submodule(parent), attribute, ReferenceHardsigmoid())
    return twin


# ----------------------------------------------------------------------------- cases
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class RealCase:
    """A real model with a batch and a loss.

    Attributes:
        name: Test id.
        model: Returns one tensor (logits) for ``inputs``.
        inputs: A tensor or a dict of keyword arguments (examples on dim 0).
        targets: Targets of the loss.
        loss: ``reduction -> loss_fn(output, targets)``.
        hessian: ``None`` where the engine computes the exact Hessian diagonal, else a
            pattern of the error it raises.
    """

    name: str
    model: nn.Module
    inputs: Tensor | dict[str, Tensor]
    targets: Tensor
    loss: Callable[[str], LossFn]
    hessian: str | None = None
    notes: dict[str, str] = field(default_factory=dict)

    def run(self, *quantities, reduction: str = "mean") -> Tensor:
        """Forward, loss and backward inside ``extend`` with ``quantities``."""
        from secorder_hooks import extend

        self.model.zero_grad()
        with extend(self.model, *quantities):
            loss = self.loss(reduction)(self.output(), self.targets)
            loss.backward()
        return loss

    def output(self) -> Tensor:
        if isinstance(self.inputs, dict):
            return self.model(**self.inputs)
        return self.model(self.inputs)


def lm_loss(reduction: str) -> LossFn:
    """Language-model loss over all tokens: ``cross_entropy(logits [N*T, V], labels [N*T])`` (-100 ignored)."""

    def loss(logits: Tensor, labels: Tensor) -> Tensor:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction=reduction)

    return loss


def ce_loss(reduction: str) -> LossFn:
    return lambda logits, labels: F.cross_entropy(logits, labels, reduction=reduction)


class Logits(nn.Module):
    """A Hugging Face model returning its ``logits`` tensor (keyword arguments passed through)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **kwargs: Tensor) -> Tensor:
        return self.model(**kwargs).logits


VOCAB, T, N = 16, 4, 3
ATTENTION = ("eager", "sdpa")


def _token_batch(padded: bool) -> tuple[dict[str, Tensor], Tensor]:
    ids = torch.randint(0, VOCAB, (N, T))
    inputs = {"input_ids": ids}
    labels = ids.clone()
    if padded:
        mask = torch.ones(N, T, dtype=torch.long)
        mask[1, -2:] = 0  # example 1 is two tokens shorter (right padding)
        labels[1, -2:] = -100
        inputs["attention_mask"] = mask
    return inputs, labels


def _fused_attention_error(attn: str) -> str:
    return "ScaledDotProduct.*attn_implementation" if attn == "sdpa" else "BmmBackward0"


def gpt2(attn: str = "eager", padded: bool = False) -> RealCase:
    """``GPT2LMHeadModel`` (1 layer, 2 heads, width 8), LM loss over all tokens."""
    transformers = import_transformers()
    config = transformers.GPT2Config(
        n_layer=1,
        n_head=2,
        n_embd=8,
        vocab_size=VOCAB,
        n_positions=8,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation=attn,
    )
    model = Logits(transformers.GPT2LMHeadModel(config)).double().eval()
    inputs, labels = _token_batch(padded)
    name = f"gpt2-{attn}{'-padded' if padded else ''}"
    return RealCase(name, model, inputs, labels, lm_loss, hessian=_fused_attention_error(attn))


def bert(attn: str = "eager", padded: bool = False) -> RealCase:
    """``BertForSequenceClassification`` (1 layer, 2 heads, width 8), 3 classes."""
    transformers = import_transformers()
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=8,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation=attn,
    )
    model = Logits(transformers.BertForSequenceClassification(config)).double().eval()
    inputs, _ = _token_batch(padded)
    name = f"bert-{attn}{'-padded' if padded else ''}"
    return RealCase(name, model, inputs, torch.randint(0, 3, (N,)), ce_loss, hessian=_fused_attention_error(attn))


def _randomize_batchnorm(model: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics, so eval-mode normalization is not the identity."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return model


TRAINABLE = {
    "mobilenet_v3_small": ("features.0.", "features.1.", "features.11.block.1.", "classifier.3."),
    "efficientnet_b0": ("features.0.", "features.1.", "features.7.0.block.1.", "classifier.1."),
}
"""Trainable parameters of the larger CNNs (the others frozen, to bound the brute force's time): the
first convolution, the first block (depthwise convolution, squeeze-excitation), a late block's
depthwise convolution and the classifier, so every column still travels through the whole network."""

CLASSIFIER_SCALE = {"efficientnet_b0": ("classifier.1", 0.2)}
"""Classifiers scaled down at construction so that the softmax is not degenerate: efficientnet_b0's
random logits (0.36, 0.48, 5.85) give two classes probability 0.004, which the Monte-Carlo test's
256 draws see about twice, so the runs' standard error misses the rare-class terms that dominate
those entries' expectation (scaled by 0.2: probabilities 0.20 to 0.60)."""


def torchvision_cnn(name: str) -> RealCase:
    """``resnet18``, ``mobilenet_v3_small`` or ``efficientnet_b0`` (3 classes) in eval mode on [2, 3, 32, 32]."""
    models = import_torchvision().models
    model = _randomize_batchnorm(getattr(models, name)(num_classes=3)).double().eval()
    if name in TRAINABLE:
        for key, p in model.named_parameters():
            p.requires_grad_(key.startswith(TRAINABLE[name]))
    if name in CLASSIFIER_SCALE:
        classifier, scale = CLASSIFIER_SCALE[name]
        with torch.no_grad():
            for p in model.get_submodule(classifier).parameters():
                p.mul_(scale)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    return RealCase(name, model, x, torch.randint(0, 3, (2,)), ce_loss)


def vit() -> RealCase:
    """``VisionTransformer`` (8x8 images, 4x4 patches, 1 layer, 2 heads, width 8)."""
    models = import_torchvision().models
    model = models.VisionTransformer(
        image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16, num_classes=3
    )
    with torch.no_grad():  # zeros at initialization: give them values
        model.heads.head.weight.normal_(0, 0.5)
        model.class_token.normal_()
    model = model.double().eval()
    x = torch.randn(N, 3, 8, 8, dtype=torch.float64)
    return RealCase("vit", model, x, torch.randint(0, 3, (N,)), ce_loss, hessian=_fused_attention_error("sdpa"))


class RNNClassifier(nn.Module):
    """``[N, T, 4]`` -> bidirectional ``nn.LSTM`` / ``nn.GRU`` (batch_first) -> Linear on the last step."""

    def __init__(self, kind: type[nn.RNNBase]) -> None:
        super().__init__()
        self.rnn = kind(4, 3, batch_first=True, bidirectional=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def rnn(kind: type[nn.RNNBase]) -> RealCase:
    model = RNNClassifier(kind).double()
    x = torch.randn(N, 3, 4, dtype=torch.float64)
    return RealCase(kind.__name__.lower(), model, x, torch.randint(0, 3, (N,)), ce_loss)


REAL: dict[str, Callable[[], RealCase]] = {
    **{f"gpt2-{a}": (lambda a=a: gpt2(a)) for a in ATTENTION},
    "gpt2-eager-padded": lambda: gpt2("eager", padded=True),
    **{f"bert-{a}": (lambda a=a: bert(a)) for a in ATTENTION},
    "bert-eager-padded": lambda: bert("eager", padded=True),
    "resnet18": lambda: torchvision_cnn("resnet18"),
    "mobilenet_v3_small": lambda: torchvision_cnn("mobilenet_v3_small"),
    "efficientnet_b0": lambda: torchvision_cnn("efficientnet_b0"),
    "vit": vit,
    "lstm": lambda: rnn(nn.LSTM),
    "gru": lambda: rnn(nn.GRU),
}
SLOW = {"mobilenet_v3_small", "efficientnet_b0"}


def make(name: str) -> RealCase:
    """Build case ``name`` deterministically (seed 0)."""
    torch.manual_seed(0)
    return REAL[name]()
