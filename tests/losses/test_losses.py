"""Loss terms: exact square roots and Monte-Carlo columns against torch.func.hessian."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses import (
    AutogradLossTerm,
    LossInputError,
    LossKind,
    LossTerm,
    SqrtColumns,
    loss_term_from_call,
    loss_term_from_type,
    make_loss_call,
)
from secorder_hooks.losses.cross_entropy import _sample_classes

DT = torch.float64


# ----------------------------------------------------------------------------- helpers


def reference_blocks(loss_fn: Callable[[Tensor], Tensor], f: Tensor) -> Tensor:
    """``[N, F, F]`` diagonal blocks of the Hessian of ``loss_fn`` at ``f``; asserts block diagonality."""
    n, k = f.shape[0], f[0].numel()
    h = torch.func.hessian(loss_fn)(f.detach()).reshape(n, k, n, k)
    diag = h[torch.arange(n), :, torch.arange(n), :]
    off = h.clone()
    off[torch.arange(n), :, torch.arange(n), :] = 0
    assert off.abs().max() == 0
    return diag


def reconstruct(sc: SqrtColumns, n: int) -> Tensor:
    """``[N, F, F]``: sum_k w_kn s_kn s_kn^T."""
    cols = sc.columns.reshape(sc.columns.shape[0], n, -1)
    w = torch.ones(cols.shape[:2], dtype=cols.dtype) if sc.weights is None else sc.weights
    assert w.shape == cols.shape[:2]
    return torch.einsum("kn,kni,knj->nij", w, cols, cols)


def term_of(fn: Callable[..., Tensor], *args: Tensor, **kwargs) -> tuple[Tensor, LossTerm]:
    """Call a loss functional and build its term through the engine's factory path."""
    result = fn(*args, **kwargs)
    return result, loss_term_from_call(make_loss_call(fn, args, kwargs, result))


def check_exact(term: LossTerm, loss_fn: Callable[[Tensor], Tensor], f: Tensor) -> None:
    sc = term.sqrt_hessian()
    assert sc.columns.shape[1:] == f.shape == term.shape
    torch.testing.assert_close(reconstruct(sc, f.shape[0]), reference_blocks(loss_fn, f), rtol=1e-10, atol=1e-12)


def check_mc(term: LossTerm, exact: Tensor, n: int, mc_samples: int = 20000, seed: int = 1) -> None:
    """One call with M samples estimates the exact block; error within 5 standard errors.

    The sample variance of a product :math:`u_i u_j` of two rare events (classes of small
    probability at two positions) underestimates its variance whenever the joint event is not
    drawn, so the standard error uses the larger of the sample variance and
    :math:`E[u_i^2] E[u_j^2]`, the variance of a product of independent zero-mean entries.
    """
    cols = term.sample_sqrt_hessian(mc_samples, torch.Generator().manual_seed(seed))
    assert cols.shape == (mc_samples, *term.shape)
    u = cols.reshape(mc_samples, n, -1) * math.sqrt(mc_samples)  # unscaled sampled gradients
    outer = torch.einsum("mni,mnj->mnij", u, u)
    estimate = (cols.reshape(mc_samples, n, -1)[..., :, None] * cols.reshape(mc_samples, n, -1)[..., None, :]).sum(0)
    torch.testing.assert_close(estimate, outer.mean(0))
    second = u.square().mean(0)  # [N, K]
    variance = torch.maximum(outer.var(0), torch.einsum("ni,nj->nij", second, second))
    stderr = (variance / mc_samples).sqrt()
    assert ((estimate - exact).abs() <= 5 * stderr + 1e-12).all()
    assert (exact.abs() > 1e-3).any()  # the check is not vacuous
    again = term.sample_sqrt_hessian(mc_samples, torch.Generator().manual_seed(seed))
    assert torch.equal(cols, again)
    other = term.sample_sqrt_hessian(mc_samples, torch.Generator().manual_seed(seed + 1))
    assert not torch.equal(cols, other)


def leaf(*shape: int, scale: float = 1.0) -> Tensor:
    return (scale * torch.randn(*shape, dtype=DT)).requires_grad_()


# ----------------------------------------------------------------------------- cross-entropy


CE_SHAPES = [(5, 4), (4, 3, 5), (3, 3, 2, 2)]


@pytest.mark.parametrize("shape", CE_SHAPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
def test_cross_entropy_index_targets(shape, reduction, weighted, smoothing):
    x = leaf(*shape)
    c = shape[1]
    y = torch.randint(0, c, (shape[0], *shape[2:]))
    y.view(-1)[::3] = -1  # ignored positions
    opts = dict(reduction=reduction, ignore_index=-1, label_smoothing=smoothing)
    if weighted:
        opts["weight"] = torch.rand(c, dtype=DT) + 0.5
    _, term = term_of(F.cross_entropy, x, y, **opts)
    assert term.edge.node is get_gradient_edge(x).node
    check_exact(term, lambda f: F.cross_entropy(f, y, **opts), x)


@pytest.mark.parametrize("shape", [(4, 1), (4, 2), (3, 2, 3), (5, 7)])
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["moderate", "confident"])
def test_softmax_square_root_has_c_minus_one_columns(shape, scale):
    """The rank-deficient root: C - 1 columns per position (one for C = 1), exact even for near one-hot p."""
    x = leaf(*shape, scale=scale)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    _, term = term_of(F.cross_entropy, x, y)
    positions = math.prod(shape[2:])
    assert term.sqrt_hessian().columns.shape[0] == max(shape[1] - 1, 1) * positions
    check_exact(term, lambda f: F.cross_entropy(f, y), x)


@pytest.mark.parametrize("shape", CE_SHAPES[:2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_probability_targets(shape, reduction):
    x = leaf(*shape)
    t = torch.softmax(torch.randn(*shape, dtype=DT), 1)
    opts = dict(reduction=reduction, weight=torch.rand(shape[1], dtype=DT) + 0.5, label_smoothing=0.1)
    _, term = term_of(F.cross_entropy, x, t, **opts)
    check_exact(term, lambda f: F.cross_entropy(f, t, **opts), x)


def test_cross_entropy_negative_class_weight_gives_signs():
    x = leaf(6, 3)
    y = torch.arange(6) % 3
    w = torch.tensor([1.0, -0.5, 2.0], dtype=DT)
    _, term = term_of(F.cross_entropy, x, y, weight=w, reduction="sum")
    sc = term.sqrt_hessian()
    assert sc.weights is not None and (sc.weights < 0).any()
    check_exact(term, lambda f: F.cross_entropy(f, y, weight=w, reduction="sum"), x)
    with pytest.raises(UnsupportedLossError):
        term.sample_sqrt_hessian(1)


def test_cross_entropy_sequence_flattened():
    """[N, T, C] logits passed as reshape(-1, C): columns are shaped like the loss input [N*T, C]."""
    n, t, c = 3, 4, 5
    x = leaf(n, t, c)
    y = torch.randint(0, c, (n, t))
    flat = x.reshape(-1, c)
    _, term = term_of(F.cross_entropy, flat, y.reshape(-1))
    assert term.shape == (n * t, c)
    assert term.edge.node is get_gradient_edge(flat).node
    check_exact(term, lambda f: F.cross_entropy(f, y.reshape(-1)), flat)


def test_cross_entropy_rejects_unbatched_and_bad_targets():
    with pytest.raises(UnsupportedLossError, match="unbatched"):
        term_of(F.cross_entropy, leaf(4), torch.tensor(1))
    with pytest.raises(UnsupportedLossError, match="reduction"):
        term_of(F.cross_entropy, leaf(3, 4), torch.tensor([0, 1, 2]), reduction="none")


@pytest.mark.parametrize("shape", [(4, 3), (3, 3, 4)])
def test_cross_entropy_monte_carlo(shape):
    x = leaf(*shape)
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    opts = dict(weight=torch.rand(shape[1], dtype=DT) + 0.5, label_smoothing=0.1)
    _, term = term_of(F.cross_entropy, x, y, **opts)
    # full per-example block, cross-position entries included (zero in expectation)
    check_mc(term, reference_blocks(lambda f: F.cross_entropy(f, y, **opts), x), shape[0])


def test_monte_carlo_single_sample_is_unbiased():
    """M = 1 averaged over repeated calls: no 1/M shrinkage at either M."""
    x = leaf(3, 4)
    y = torch.tensor([0, 2, 3])
    _, term = term_of(F.cross_entropy, x, y)
    exact = reconstruct(term.sqrt_hessian(), 3)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([term.sample_sqrt_hessian(1, gen)[0] for _ in range(2000)])  # [R, N, C]
    outer = torch.einsum("rni,rnj->rnij", draws, draws)
    stderr = outer.std(0) / math.sqrt(draws.shape[0])
    assert ((outer.mean(0) - exact).abs() <= 5 * stderr + 1e-12).all()
    assert draws[0].abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_classes_frequencies_and_zero_probabilities(dtype):
    """Inverse-CDF draws: frequencies within 5 standard errors, impossible classes never drawn."""
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]], dtype=dtype)
    draws = _sample_classes(probs * 3.0, 20000, torch.Generator().manual_seed(0))  # unnormalized input
    assert draws.shape == (20000, 2, 1) and draws.dtype == torch.int64
    freq = F.one_hot(draws[..., 0], probs.shape[1]).to(torch.float64).mean(0)  # [R, C]
    stderr = (probs.double() * (1 - probs.double()) / draws.shape[0]).sqrt()
    assert ((freq - probs.double()).abs() <= 5 * stderr).all()
    assert (freq[probs == 0] == 0).all()


def test_sample_classes_reproducible_with_generator():
    probs = torch.softmax(torch.randn(7, 5, dtype=DT), -1)
    first = _sample_classes(probs, 3, torch.Generator().manual_seed(4))
    again = _sample_classes(probs, 3, torch.Generator().manual_seed(4))
    other = _sample_classes(probs, 3, torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and not torch.equal(first, other)


# ----------------------------------------------------------------------------- NLL


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_nll_over_log_softmax(shape, reduction):
    x = leaf(*shape)
    logits = 2.0 * x  # has a grad_fn: the edge must be this node's output
    y = torch.randint(0, shape[1], (shape[0], *shape[2:]))
    y.view(-1)[0] = -100
    w = torch.rand(shape[1], dtype=DT) + 0.5
    loss, term = term_of(F.nll_loss, F.log_softmax(logits, dim=1), y, weight=w, reduction=reduction)
    assert term.edge.node is logits.grad_fn and term.shape == logits.shape
    (g_edge,) = torch.autograd.grad(loss, [term.edge], retain_graph=True)
    (g_logits,) = torch.autograd.grad(loss, [logits])
    torch.testing.assert_close(g_edge, g_logits)
    loss_fn = lambda f: F.nll_loss(F.log_softmax(f, dim=1), y, weight=w, reduction=reduction)  # noqa: E731
    check_exact(term, loss_fn, logits)
    check_mc(term, reference_blocks(loss_fn, logits), shape[0])


@pytest.mark.parametrize(
    "make_input",
    [
        lambda x: x.detach(),  # no history
        lambda x: torch.softmax(x, 1).log(),  # not log_softmax
        lambda x: F.log_softmax(x, dim=0),  # wrong axis
        lambda x: F.log_softmax(x, dim=-1).reshape(x.shape),  # a view on top
    ],
)
def test_nll_needs_log_softmax_over_classes(make_input):
    x = leaf(4, 3)
    inp = make_input(x)
    with pytest.raises(UnsupportedLossError, match="log_softmax"):
        term_of(F.nll_loss, inp, torch.tensor([0, 1, 2, 0]))


# ----------------------------------------------------------------------------- MSE, BCE


@pytest.mark.parametrize("shape", [(5,), (4, 3), (3, 2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse(shape, reduction, weighted):
    x, y = leaf(*shape), torch.randn(*shape, dtype=DT)
    opts = dict(reduction=reduction)
    if weighted:
        opts["weight"] = torch.rand(*shape, dtype=DT) + 0.1
    _, term = term_of(F.mse_loss, x, y, **opts)
    loss_fn = lambda f: F.mse_loss(f, y, **opts)  # noqa: E731
    check_exact(term, loss_fn, x)
    if shape == (4, 3):
        check_mc(term, reference_blocks(loss_fn, x), shape[0])


def test_mse_rejects_broadcasting():
    with pytest.raises(UnsupportedLossError, match="broadcasting"), pytest.warns(UserWarning):
        term_of(F.mse_loss, leaf(4, 1), torch.randn(4, dtype=DT))


@pytest.mark.parametrize("shape", [(6,), (4, 3), (3, 2, 3)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("options", ["plain", "weight", "pos_weight", "both"])
def test_bce_with_logits(shape, reduction, options):
    x = leaf(*shape, scale=2.0)
    y = torch.rand(*shape, dtype=DT)  # soft targets
    opts: dict = dict(reduction=reduction)
    if options in ("weight", "both"):
        opts["weight"] = torch.rand(*shape, dtype=DT) + 0.1
    if options in ("pos_weight", "both"):
        opts["pos_weight"] = torch.rand(shape[-1], dtype=DT) + 0.5
    _, term = term_of(F.binary_cross_entropy_with_logits, x, y, **opts)
    loss_fn = lambda f: F.binary_cross_entropy_with_logits(f, y, **opts)  # noqa: E731
    check_exact(term, loss_fn, x)
    if shape == (4, 3) and reduction == "mean":
        check_mc(term, reference_blocks(loss_fn, x), shape[0])


# ----------------------------------------------------------------------------- autograd term


def student_t_nll(f: Tensor, y: Tensor, nu: float = 3.0) -> Tensor:
    return (0.5 * (nu + 1) * torch.log1p((f - y) ** 2 / nu)).sum()


AUTOGRAD_LOSSES = {
    "quartic": lambda f, y: ((f - y) ** 4).mean(),
    "student_t": student_t_nll,  # indefinite for |f - y| > sqrt(nu)
    "huber": lambda f, y: F.huber_loss(f, y, delta=0.5),
    "smooth_l1": lambda f, y: F.smooth_l1_loss(f, y, beta=0.7, reduction="sum"),
    "kl_div": lambda f, y: F.kl_div(F.log_softmax(f, -1), torch.softmax(y, -1), reduction="batchmean"),
    "mixed": lambda f, y: (torch.sin(f[:, 0] * f[:, 1]) + (f * y).sum(1) ** 2).sum(),  # dense blocks
}


@pytest.mark.parametrize("name", list(AUTOGRAD_LOSSES))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_autograd_term(name, chunk_size):
    loss_fn = AUTOGRAD_LOSSES[name]
    x, y = leaf(5, 3, scale=2.0), torch.randn(5, 3, dtype=DT)
    f = x * 1.0
    term = AutogradLossTerm(loss_fn(f, y), get_gradient_edge(f), f.shape, chunk_size=chunk_size)
    check_exact(term, lambda z: loss_fn(z, y), f)
    if name == "student_t":
        assert (term.sqrt_hessian().weights < 0).any()
    with pytest.raises(UnsupportedLossError, match="Monte-Carlo"):
        term.sample_sqrt_hessian(1)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda f: f.sum() ** 2,
        lambda f: f.var(0).sum(),
        lambda f: F.log_softmax(f, dim=0)[:, 0].sum(),
    ],
)
def test_autograd_term_rejects_coupled_losses(loss_fn):
    f = leaf(4, 3) * 1.0
    term = AutogradLossTerm(loss_fn(f), get_gradient_edge(f), f.shape)
    with pytest.raises(UnsupportedLossError, match="couples examples"):
        term.sqrt_hessian()


def test_autograd_term_linear_and_unreachable():
    f = leaf(4, 3) * 1.0
    term = AutogradLossTerm((3.0 * f).sum(), get_gradient_edge(f), f.shape)
    assert term.sqrt_hessian().columns.abs().max() == 0
    g = leaf(4, 3) * 1.0
    with pytest.raises(UnsupportedLossError, match="does not depend"):
        AutogradLossTerm((g**2).sum(), get_gradient_edge(f), f.shape).sqrt_hessian()


# ----------------------------------------------------------------------------- factory


def test_loss_type_parse():
    assert LossKind.parse("cross_entropy") is LossKind.NLL
    assert LossKind.parse("Gaussian") is LossKind.MSE
    assert LossKind.parse("bernoulli") is LossKind.BCE
    assert LossKind.parse(LossKind.MSE) is LossKind.MSE
    with pytest.raises(NotImplementedError, match=r"'nll'.*'bce'"):
        LossKind.parse("hinge")


@pytest.mark.parametrize(
    ("loss_type", "functional", "make_target"),
    [
        ("nll", F.cross_entropy, lambda out: torch.randint(0, out.shape[1], (out.shape[0],))),
        ("mse", F.mse_loss, lambda out: torch.randn_like(out)),
        ("bce", F.binary_cross_entropy_with_logits, lambda out: torch.rand_like(out)),
    ],
)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_term_from_type(loss_type, functional, make_target, reduction):
    out = leaf(4, 3) * 1.0
    target = make_target(out)
    loss, term = loss_term_from_type(loss_type, out, target, reduction)
    torch.testing.assert_close(loss, functional(out, target, reduction=reduction))
    assert term.edge.node is out.grad_fn
    check_exact(term, lambda f: functional(f, target, reduction=reduction), out)


def test_loss_term_from_type_validation():
    out = leaf(4, 3)
    with pytest.raises(LossInputError, match="batch size"):
        loss_term_from_type("nll", out, torch.zeros(5, dtype=torch.long))
    with pytest.raises(LossInputError, match=r"\[0, 3\)"):
        loss_term_from_type("nll", out, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(LossInputError, match="shape"):
        loss_term_from_type("nll", out, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(LossInputError, match="floating"):
        loss_term_from_type("mse", out, torch.zeros(4, 3, dtype=torch.long))
    with pytest.raises(LossInputError, match="shape"):
        loss_term_from_type("bce", out, torch.zeros(4, 2, dtype=DT))
    with pytest.raises(UnsupportedLossError, match="reduction"):
        loss_term_from_type("mse", out, torch.zeros(4, 3, dtype=DT), reduction="none")
    with pytest.raises(UnsupportedLossError, match="loss_type"):
        loss_term_from_type("poisson", out, torch.zeros(4, 3, dtype=DT))
