"""Every quantity on real models (Hugging Face GPT-2 and BERT, torchvision CNNs and ViT, LSTM/GRU)
against brute force in float64 (``tests/reference.py``), both loss reductions."""

from __future__ import annotations

import pytest
import torch

import secorder_hooks as sh
from tests import reference
from tests.real_models import REAL, SLOW, make

FIRST_ORDER = (sh.BatchGrad(), sh.SumGradSquared(), sh.BatchL2Grad(), sh.Variance())
GGN = (sh.DiagGGNExact(), sh.BatchDiagGGNExact())
HESSIAN = (sh.DiagHessian(), sh.BatchDiagHessian())
NAMES = [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name for name in REAL]
REDUCTIONS = ["mean", "sum"]
# The parameters kept trainable for the Hessian brute force of the CNNs (one column per entry).
HESSIAN_SUBSETS = {
    "resnet18": ("bn1.bias", "fc.bias"),
    "mobilenet_v3_small": ("features.1.block.1.fc1.bias", "classifier.3.bias"),
    "efficientnet_b0": ("features.1.0.block.1.fc1.bias", "classifier.1.bias"),
}
HESSIAN_NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in HESSIAN_SUBSETS else p for n, p in zip(REAL, NAMES)]


def close(actual, expected, name):
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8, msg=name)


def trainable(case):
    return [(k, p) for k, p in case.model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_first_order(name, reduction):
    case = make(name)
    case.run(*FIRST_ORDER, reduction=reduction)
    per_example = reference.per_example_grads(case.model, case.loss(reduction), case.inputs, case.targets)
    for k, p in trainable(case):
        g = per_example[k]
        assert p.grad_batch.shape == g.shape, k
        close(p.grad_batch, g, k)
        close(p.grad_batch.sum(0), p.grad, k)
        close(p.sum_grad_squared, g.square().sum(0), k)
        close(p.batch_l2, g.flatten(1).square().sum(1), k)
        close(p.variance, g.var(0, unbiased=False), k)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_ggn(name, reduction):
    case = make(name)
    case.run(*GGN, reduction=reduction)
    per_example = reference.ggn_diagonal_by_example(
        case.model, case.loss(reduction), case.inputs, case.targets, per_example=True
    )
    for k, p in trainable(case):
        close(p.diag_ggn_exact_batch, per_example[k], k)
        close(p.diag_ggn_exact, per_example[k].sum(0), k)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", HESSIAN_NAMES)
def test_hessian(name, reduction):
    case = make(name)
    if case.hessian is not None:
        with pytest.raises(sh.UnsupportedOperationError, match=case.hessian):
            case.run(*HESSIAN, reduction=reduction)
        return
    subset = HESSIAN_SUBSETS.get(name)
    if subset is not None:
        for k, p in case.model.named_parameters():
            p.requires_grad_(k.startswith(subset))
    case.run(*HESSIAN, reduction=reduction)
    loss_fn = case.loss(reduction)
    expected = reference.hessian_diagonal_by_columns(case.model, loss_fn, case.inputs, case.targets)
    for k, p in trainable(case):
        close(p.diag_h, expected[k], k)
    if subset is None:  # per example: one Hessian per example, for the small models
        per_example = reference.per_example_hessian_diagonal(case.model, loss_fn, case.inputs, case.targets)
        for k, p in trainable(case):
            close(p.diag_h_batch, per_example[k], k)
    else:
        for k, p in trainable(case):
            close(p.diag_h_batch.sum(0), p.diag_h, k)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_function_api_on_a_hugging_face_model(attn):
    """Keyword inputs (input_ids, attention_mask), a loss of the model's output object, [N, T] targets.

    The engine refuses the Hessian through attention; model_hessian_diagonal falls back to the
    exact generic path, which runs attention in its math kernel (fused kernels have no double backward).
    """
    case = make(f"gpt2-{attn}")
    hf = case.model.model  # the GPT2LMHeadModel itself: returns a ModelOutput
    inputs = {**case.inputs, "attention_mask": torch.ones_like(case.inputs["input_ids"])}
    lm = case.loss("mean")

    def loss_fn(output, labels):
        return lm(output.logits, labels)

    with pytest.warns(sh.FallbackWarning, match="BmmBackward0|ScaledDotProduct"):
        hessian = sh.model_hessian_diagonal(hf, loss_fn, inputs, case.targets)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        expected = reference.hessian_diagonal_by_columns(case.model, lm, case.inputs, case.targets, chunk=512)
    for (k, _), value in zip(hf.named_parameters(), hessian):
        close(value, expected[f"model.{k}"], k)
    empirical = sh.empirical_fisher_diagonal(hf, loss_fn, inputs, case.targets)
    per_example = reference.per_example_grads(case.model, lm, case.inputs, case.targets)
    c = 1.0 / case.targets.numel()
    for (k, _), value in zip(hf.named_parameters(), empirical):
        close(value, per_example[f"model.{k}"].square().sum(0) / c, k)
