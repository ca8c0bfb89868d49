"""Every quantity on real models (Hugging Face GPT-2 and BERT, torchvision CNNs and ViT, LSTM/GRU)
against brute force in float64 (``tests/support/reference.py``), both loss reductions."""

from __future__ import annotations

import pytest
import torch

import secorder_hooks as sh
from tests.support import reference
from tests.support.real_models import REAL, SLOW, make, reference_twin

FIRST_ORDER = (sh.BatchGrad(), sh.SumGradSquared(), sh.BatchL2Grad(), sh.Variance())
GGN = (sh.DiagGGNExact(), sh.BatchDiagGGNExact())
HESSIAN = (sh.DiagHessian(), sh.BatchDiagHessian())
REDUCTIONS = ("mean", "sum")
SLOW_MARKS = (pytest.mark.slow,)
# The heaviest cases (2 to 8 minutes each on 2 cores) are also marked ``exhaustive``: run by
# hand (``pytest -m exhaustive``), not by CI. CI's slow run keeps every CNN's first-order and
# GGN cases, mobilenet's Monte-Carlo case and resnet18's Hessian case with the mean reduction
# (the reductions differ by the factor c, which the fast models test for every quantity).
HEAVY_MARKS = (pytest.mark.slow, pytest.mark.exhaustive)


def cases(
    slow: frozenset[str] = frozenset(), heavy: frozenset[str] = frozenset(), heavy_sum: frozenset[str] = frozenset()
) -> list:
    """``(name, reduction)`` of every real model: those in ``slow`` marked slow, those in ``heavy``
    marked heavy, and those in ``heavy_sum`` slow with ``"mean"`` and heavy with ``"sum"``."""
    params = []
    for name in REAL:
        for reduction in REDUCTIONS:
            if name in heavy or (name in heavy_sum and reduction == "sum"):
                marks = HEAVY_MARKS
            elif name in slow or name in heavy_sum:
                marks = SLOW_MARKS
            else:
                marks = ()
            params.append(pytest.param(name, reduction, marks=marks, id=f"{name}-{reduction}"))
    return params


# The parameters kept trainable for the Hessian brute force of the CNNs (one column per entry).
# The engine's cost is one backward per element of every curved activation (Hardswish, SiLU,
# sigmoid, squeeze-excitation products) above a trainable parameter, down to it: mobilenet's
# first squeeze-excitation lies below about 18k such elements per example; efficientnet's
# first would lie below 145k (more than 30 minutes here), so its subset starts at the last
# squeeze-excitation of stage 6 (7k elements: SiLU, sigmoid and product terms, stochastic depth).
HESSIAN_SUBSETS = {
    "resnet18": ("bn1.bias", "fc.bias"),
    "mobilenet_v3_small": ("features.1.block.1.fc1.bias", "classifier.3.bias"),
    "efficientnet_b0": ("features.6.3.block.2.fc1.bias", "classifier.1.bias"),
}
FIRST_ORDER_CASES = cases(slow=frozenset(SLOW))
MC_CASES = cases(heavy=frozenset({"resnet18", "efficientnet_b0"}), heavy_sum=frozenset({"mobilenet_v3_small"}))
HESSIAN_CASES = cases(heavy=frozenset({"mobilenet_v3_small", "efficientnet_b0"}), heavy_sum=frozenset({"resnet18"}))


def close(actual, expected, name):
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8, msg=name)


def trainable(case):
    return [(k, p) for k, p in case.model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize(("name", "reduction"), FIRST_ORDER_CASES)
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


@pytest.mark.parametrize(("name", "reduction"), FIRST_ORDER_CASES)
def test_ggn(name, reduction):
    case = make(name)
    case.run(*GGN, reduction=reduction)
    per_example = reference.ggn_diagonal_by_example(
        case.model, case.loss(reduction), case.inputs, case.targets, per_example=True
    )
    for k, p in trainable(case):
        close(p.diag_ggn_exact_batch, per_example[k], k)
        close(p.diag_ggn_exact, per_example[k].sum(0), k)


MC_REPEATS, MC_SAMPLES = 32, 4
MIN_PROBABILITY = 0.05
"""Every class's probability must exceed this (``real_models.CLASSIFIER_SCALE``): the 32 x 4 draws per
example must see every class several times, or the standard error misses the rare classes' terms."""


class Moments:
    """Running mean and standard error of repeated draws (Welford's update: constant draws give exactly 0)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, value: torch.Tensor) -> None:
        self.count += 1
        delta = value - self.mean
        self.mean = self.mean + delta / self.count
        self.m2 = self.m2 + delta * (value - self.mean)

    def standard_error(self) -> torch.Tensor:
        return (self.m2 / (self.count - 1) / self.count) ** 0.5


@pytest.mark.parametrize(("name", "reduction"), MC_CASES)
def test_monte_carlo_ggn_in_expectation(name, reduction):
    """DiagGGNMC averaged over 32 runs of 4 samples (fixed generator) against the brute-force GGN.

    With the standard error from the runs' sample variance, ``z = (mean - exact) / SE`` is
    close to t-distributed (31 degrees of freedom) if the estimate is unbiased: every
    entry's ``|z| < 10`` (beyond that: probability below 1e-10 per entry) and, for the sum
    of each parameter tensor's entries, ``|z| < 6``. A scale error (the loss divided by the
    number of samples, a missing reduction factor) moves the sums by hundreds of standard
    errors. Entries without variance (unused embedding rows) must equal the GGN; entries
    zero up to rounding in both (BERT's key biases: softmax is invariant to them) are
    skipped. Scales differ by 1e17 between the layers of the random CNNs: every test is
    relative to each entry's own standard error.
    """
    case = make(name)
    with torch.no_grad():  # a class of tiny probability is drawn too rarely for the runs' standard error
        output = case.output()
    assert output.reshape(-1, output.shape[-1]).softmax(-1).min() > MIN_PROBABILITY, "degenerate softmax"
    generator = torch.Generator().manual_seed(0)
    entries = {k: Moments() for k, _ in trainable(case)}
    totals = {k: Moments() for k, _ in trainable(case)}
    for _ in range(MC_REPEATS):
        case.run(sh.DiagGGNMC(mc_samples=MC_SAMPLES, generator=generator), reduction=reduction)
        for k, p in trainable(case):
            entries[k].add(p.diag_ggn_mc)
            totals[k].add(p.diag_ggn_mc.sum())
    exact = reference.ggn_diagonal_by_example(case.model, case.loss(reduction), case.inputs, case.targets)
    scale = max(e.abs().max() for e in exact.values())
    tested = 0
    for k, moments in entries.items():
        mean, se = moments.mean, moments.standard_error()
        rounding = (exact[k].abs() <= 1e-30 * scale) & (mean.abs() <= 1e-30 * scale)  # zero up to rounding
        constant = (se == 0) & ~rounding
        close(mean[constant], exact[k][constant], k)
        random = (se > 0) & ~rounding
        if not random.any():
            continue
        z = (mean - exact[k])[random] / se[random]
        assert z.abs().max() < 10, (k, z.abs().max())
        total = (totals[k].mean - exact[k].sum()) / totals[k].standard_error()
        assert total.abs() < 6, (k, total)
        tested += 1
    assert tested >= len(entries) // 2


@pytest.mark.parametrize(("name", "reduction"), HESSIAN_CASES)
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
    twin = reference_twin(case.model)  # mobilenet: hardsigmoid has no double backward in torch
    if subset is None:  # the small models: the whole Hessian, and one per example, by torch.func
        expected = reference.hessian_diagonal(twin, loss_fn, case.inputs, case.targets)
        per_example = reference.per_example_hessian_diagonal(twin, loss_fn, case.inputs, case.targets)
        for k, p in trainable(case):
            close(p.diag_h, expected[k], k)
            close(p.diag_h_batch, per_example[k], k)
        return
    # the CNNs: each example's term by double backward of one-hot vectors; L is their sum
    # (the loss is separable over examples), so the total is checked too
    terms = [
        reference.hessian_diagonal_by_columns(twin, example_term(loss_fn, n), case.inputs, case.targets, chunk=64)
        for n in range(case.targets.shape[0])
    ]
    for k, p in trainable(case):
        per_example = torch.stack([term[k] for term in terms])
        close(p.diag_h_batch, per_example, k)
        close(p.diag_h, per_example.sum(0), k)


def example_term(loss_fn, n):
    """``loss_fn`` with every example's output but example ``n``'s held constant."""

    def term(output, targets):
        mask = (torch.arange(output.shape[0]) == n).reshape(-1, *[1] * (output.dim() - 1))
        return loss_fn(torch.where(mask, output, output.detach()), targets)

    return term


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
