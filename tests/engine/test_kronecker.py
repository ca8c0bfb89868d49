"""Kronecker factors (KFLR, KFAC, KFACEmpirical) against brute force where K-FAC is exact (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder_hooks as sh
from tests.support import reference, zoo

EXPAND, REDUCE = sh.WeightSharing.EXPAND, sh.WeightSharing.REDUCE


def run(model, loss_fn, x, y, *quantities):
    model.zero_grad()
    with sh.extend(model, *quantities):
        loss_fn(model(x), y).backward()


def kron(factors):
    """The block the attribute stands for (block diagonal over groups for 3-D factors; a diagonal for 1-D)."""
    if len(factors) == 1:
        (f,) = factors
        return torch.diag(f) if f.dim() == 1 else f
    first, second = factors
    if first.dim() == 2:
        return torch.kron(first, second)
    return torch.block_diag(*[torch.kron(f, s) for f, s in zip(first, second)])


def assert_blocks(model, attribute, expected, names=None):
    names = names or [k for k, p in model.named_parameters() if p.requires_grad]
    for name in names:
        p = model.get_parameter(name)
        torch.testing.assert_close(kron(getattr(p, attribute)), expected[name], atol=1e-12, rtol=1e-9, msg=name)


def one_example(case):
    return case.x[:1], case.y[:1]


# ----------------------------------------------------------------------------- exact cases
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["mlp_relu", "mlp_sigmoid", "deep_mlp", "functional", "frozen"])
def test_kflr_is_exact_for_one_example(name, reduction):
    """With N = 1 and no positions, B (x) A is the GGN block of every Linear layer of any network."""
    case = zoo.make(name, torch.float64)
    loss_fn = case.loss_fn(reduction)
    x, y = one_example(case)
    run(case.model, loss_fn, x, y, sh.KFLR(), sh.KFACEmpirical())
    assert_blocks(case.model, "kflr", reference.ggn_blocks(case.model, loss_fn, x, y))
    assert_blocks(case.model, "kfac_empirical", reference.empirical_blocks(case.model, loss_fn, x, y))


def deep_linear(*widths):
    layers = [nn.Linear(a, b) for a, b in zip(widths, widths[1:])]
    return nn.Sequential(*layers).double()


class MeanOverPositions(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).mean(1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    ("sharing", "shape", "pool"),
    [(EXPAND, (5, 4), False), (REDUCE, (5, 4), False), (EXPAND, (5, 3, 4), False), (REDUCE, (5, 3, 4), True)],
    ids=["no_positions_expand", "no_positions_reduce", "expand_setting", "reduce_setting"],
)
def test_kflr_is_exact_for_deep_linear_networks(sharing, shape, pool, reduction):
    """Eschenhagen et al. (2023): deep linear networks with MSE, a loss term per position (expand) or
    positions averaged before the loss (reduce), any N."""
    torch.manual_seed(0)
    model = deep_linear(4, 3, 3, 2)
    if pool:
        model = MeanOverPositions(model)
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    loss_fn = nn.MSELoss(reduction=reduction)
    run(model, loss_fn, x, y, sh.KFLR(sharing=sharing))
    assert_blocks(model, "kflr", reference.ggn_blocks(model, loss_fn, x, y))


def test_kflr_is_not_exact_for_the_other_sharing():
    """A test that can fail: the expand factors of the reduce setting are not the GGN block."""
    torch.manual_seed(0)
    model = MeanOverPositions(deep_linear(4, 2))
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    y = torch.randn(5, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    run(model, loss_fn, x, y, sh.KFLR(sharing=EXPAND))
    expected = reference.ggn_blocks(model, loss_fn, x, y)
    assert not torch.allclose(kron(model.net[0].weight.kflr), expected["net.0.weight"], rtol=1e-3)


CONVS = {
    "conv1d": lambda: (nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2), (3, 4, 9)),
    "conv2d": lambda: (nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)), (3, 2, 6, 5)),
    "conv2d_groups": lambda: (nn.Conv2d(6, 4, 2, padding=1, groups=2), (2, 6, 4, 4)),
    "conv3d": lambda: (nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=(0, 1, 1)), (2, 2, 3, 4, 3)),
    "conv2d_same_no_bias": lambda: (
        nn.Conv2d(2, 3, 3, padding="same", bias=False, padding_mode="reflect"),
        (2, 2, 4, 4),
    ),
}


class Pooled(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return self.conv(x).flatten(2).mean(-1)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sharing", [EXPAND, REDUCE])
@pytest.mark.parametrize("name", list(CONVS))
def test_kflr_is_exact_for_a_convolution(name, sharing, reduction):
    """One convolution with MSE on every output location (expand) or on the mean over locations (reduce)."""
    torch.manual_seed(0)
    conv, shape = CONVS[name]()
    model = (conv if sharing is EXPAND else Pooled(conv)).double()
    x = torch.randn(*shape, dtype=torch.float64)
    with torch.no_grad():
        y = torch.randn_like(model(x))
    loss_fn = nn.MSELoss(reduction=reduction)
    run(model, loss_fn, x, y, sh.KFLR(sharing=sharing))
    assert_blocks(model, "kflr", reference.ggn_blocks(model, loss_fn, x, y))


@pytest.mark.parametrize("name", ["mlp_relu", "functional"])
def test_folded_bias_is_the_joint_block(name):
    case = zoo.make(name, torch.float64)
    loss_fn = case.loss_fn("mean")
    x, y = one_example(case)
    run(case.model, loss_fn, x, y, sh.KFLR(separate_weight_and_bias=False))
    for module_name, module in case.model.named_modules():
        if isinstance(module, nn.Linear):
            prefix = f"{module_name}." if module_name else ""
            b, a = module.weight.kflr
            assert a.shape == (module.in_features + 1,) * 2
            assert not hasattr(module.bias, "kflr")
            expected = reference.joint_ggn_block(case.model, loss_fn, x, y, prefix + "weight", prefix + "bias")
            torch.testing.assert_close(torch.kron(b, a), expected, atol=1e-12, rtol=1e-9)


def test_single_linear_mse_is_exact_for_many_examples():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    run(model, loss_fn, x, y, sh.KFLR())
    assert_blocks(model, "kflr", reference.ggn_blocks(model, loss_fn, x, y))


# ----------------------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize("name", ["mlp_tanh", pytest.param("cnn", marks=pytest.mark.slow), "mlp_sigmoid"])
def test_kfac_is_unbiased(name):
    """E[B_MC] = B_KFLR (A is deterministic and equal): the sample mean of B within 5 standard errors."""
    case = zoo.make(name, torch.float64)
    loss_fn = case.loss_fn("mean")
    run(case.model, loss_fn, case.x, case.y, sh.KFLR())
    params = list(case.model.parameters())
    exact = [[f.clone() for f in p.kflr] for p in params]
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(32):
        run(case.model, loss_fn, case.x, case.y, sh.KFAC(mc_samples=16, generator=generator))
        for p, e in zip(params, exact):
            if len(e) == 2:
                torch.testing.assert_close(p.kfac[1], e[1], atol=1e-14, rtol=1e-12)
        samples.append(torch.cat([p.kfac[0].flatten() for p in params]))
    samples = torch.stack(samples)
    expected = torch.cat([e[0].flatten() for e in exact])
    standard_error = samples.std(0) / len(samples) ** 0.5
    assert ((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-12).all()


def test_kfac_samples_are_scaled_not_averaged_losses():
    """M samples give one sample's scale (1/sqrt(M) per column), and a generator reproduces them."""
    case = zoo.make("mlp_relu", torch.float64)
    loss_fn = case.loss_fn("sum")

    def b(m, seed):
        run(case.model, loss_fn, case.x, case.y, sh.KFAC(mc_samples=m, generator=torch.Generator().manual_seed(seed)))
        return case.model[2].weight.kfac[0].clone()

    torch.testing.assert_close(b(3, 1), b(3, 1))
    many = b(4000, 2)
    run(case.model, loss_fn, case.x, case.y, sh.KFLR())
    torch.testing.assert_close(many, case.model[2].weight.kflr[0], rtol=0.1, atol=0.02)


# ----------------------------------------------------------------------------- graphs and fallbacks
def test_module_called_twice_sums_both_factors_over_calls():
    """Sum over calls: the factors of a module used twice are those of two copies, added."""
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self, shared, second=None):
            super().__init__()
            self.shared, self.second = shared, second
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.tanh(self.shared(x))
            return self.head(torch.tanh((self.second or self.shared)(h)))

    twice = Twice(nn.Linear(4, 4)).double()
    copies = Twice(nn.Linear(4, 4), second=nn.Linear(4, 4)).double()
    for module in (copies.shared, copies.second):
        module.load_state_dict(twice.shared.state_dict())
    copies.head.load_state_dict(twice.head.state_dict())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    run(twice, F.cross_entropy, x, y, sh.KFLR())
    run(copies, F.cross_entropy, x, y, sh.KFLR())
    for g, f, s in zip(twice.shared.weight.kflr, copies.shared.weight.kflr, copies.second.weight.kflr):
        torch.testing.assert_close(g, f + s)
    # the bias is the weight of the constant coordinate, whose moment sums to the number of calls
    bias = copies.shared.bias.kflr[0] + copies.second.bias.kflr[0]
    torch.testing.assert_close(twice.shared.bias.kflr[0], 2 * bias)


def test_residual_graph_with_batchnorm_needs_a_fallback():
    case = zoo.make("resnet_block", torch.float64)
    with pytest.raises(sh.UnsupportedModuleError, match=r"block.bn1.*BatchNorm2d.*fallback='diagonal'"):
        sh.extend(case.model, sh.KFLR()).__enter__()


@pytest.mark.parametrize("quantity", [sh.KFLR, sh.KFACEmpirical])
def test_fallback_diagonal_is_the_exact_diagonal(quantity):
    case = zoo.make("resnet_block", torch.float64)
    loss_fn = case.loss_fn("mean")
    run(case.model, loss_fn, case.x, case.y, quantity(fallback="diagonal"), sh.DiagGGNExact(), sh.SumGradSquared())
    diagonal = "diag_ggn_exact" if quantity is sh.KFLR else "sum_grad_squared"
    attribute = quantity.attribute
    for name, module in case.model.named_modules():
        for p in module.parameters(recurse=False):
            factors = getattr(p, attribute)
            if isinstance(module, nn.BatchNorm2d):
                assert len(factors) == 1 and factors[0].dim() == 1
                torch.testing.assert_close(factors[0], getattr(p, diagonal).flatten(), msg=name)
            else:  # the block's diagonal is not the diagonal of the GGN, but the shapes are Kronecker shapes
                assert factors[0].dim() == 2


def test_generic_rule_layers_get_their_diagonal():
    case = zoo.make("bilinear", torch.float64)
    loss_fn = case.loss_fn("sum")
    run(case.model, loss_fn, case.x, case.y, sh.KFLR(fallback=sh.KronFallback.DIAGONAL))
    expected = reference.ggn_diagonal(case.model, loss_fn, case.x, case.y)
    for name in ("bil.weight", "bil.bias"):
        torch.testing.assert_close(case.model.get_parameter(name).kflr[0], expected[name].flatten())


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="sharing"):
        sh.KFLR(sharing="sideways")
    with pytest.raises(ValueError, match="mc_samples"):
        sh.KFAC(mc_samples=0)
    assert sh.KFLR(sharing="reduce").sharing is REDUCE


# ----------------------------------------------------------------------------- embeddings
class EmbeddingNet(nn.Module):
    def __init__(self, pool, act=None, **options):
        super().__init__()
        self.embed = nn.Embedding(6, 3, **options)
        self.act, self.pool = act or nn.Identity(), pool
        self.head = nn.Linear(3, 2)

    def forward(self, tokens):
        h = self.head(self.act(self.embed(tokens)))
        return h.mean(1) if self.pool else h


@pytest.mark.parametrize(
    "options", [{}, {"padding_idx": 1}, {"scale_grad_by_freq": True}], ids=["plain", "padding", "freq"]
)
@pytest.mark.parametrize(("sharing", "pool"), [(EXPAND, False), (REDUCE, True)], ids=["expand", "reduce"])
def test_embedding_factors_are_exact_for_linear_settings(sharing, pool, options):
    """Embedding - Linear, MSE per position (expand) or on the mean over positions (reduce): A (x) B, input first."""
    torch.manual_seed(0)
    model = EmbeddingNet(pool, **options).double()
    x = torch.tensor([[0, 1, 1, 4], [2, 1, 5, 5], [3, 3, 0, 1]])
    with torch.no_grad():
        y = torch.randn_like(model(x))
    loss_fn = nn.MSELoss()
    run(model, loss_fn, x, y, sh.KFLR(sharing=sharing))
    a, b = model.embed.weight.kflr
    assert a.shape == (6, 6) and b.shape == (3, 3)
    assert_blocks(model, "kflr", reference.ggn_blocks(model, loss_fn, x, y))


def test_embedding_factors_are_exact_for_one_token():
    torch.manual_seed(0)
    model = EmbeddingNet(pool=True, act=nn.Tanh()).double()
    x, y = torch.tensor([[4]]), torch.tensor([1])
    loss_fn = nn.CrossEntropyLoss()
    run(model, loss_fn, x, y, sh.KFLR(), sh.KFACEmpirical())
    assert_blocks(model, "kflr", reference.ggn_blocks(model, loss_fn, x, y))
    assert_blocks(model, "kfac_empirical", reference.empirical_blocks(model, loss_fn, x, y))


# ----------------------------------------------------------------------------- EK-FAC
def projected_diagonal(block, bases, input_first=False):
    """diag(Q^T G Q) for Q = Q_1 (x) Q_2 (per group for 3-D bases)."""
    if len(bases) == 1:
        q = bases[0]
    elif bases[0].dim() == 3:
        q = torch.block_diag(*[torch.kron(a, b) for a, b in zip(*bases)])
    else:
        q = torch.kron(*bases)
    return (q.T @ block @ q).diagonal()


@pytest.mark.parametrize("separate", [True, False], ids=["separate", "folded"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", ["mlp_tanh", "cnn", "called_twice", "sequence", "conv_groups", "embedding"])
def test_ekfac_is_the_ggn_block_projected_onto_the_eigenbasis(name, reduction, separate):
    if name == "conv_groups":
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(4, 4, 2, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(36, 3)).double()
        case = zoo.Case(name, model, torch.randn(3, 4, 4, 4, dtype=torch.float64), torch.randint(0, 3, (3,)), zoo._ce)
    elif name == "embedding":
        torch.manual_seed(0)
        model = EmbeddingNet(pool=True, act=nn.Tanh()).double()
        case = zoo.Case(name, model, torch.randint(0, 6, (4, 3)), torch.randint(0, 2, (4,)), zoo._ce)
    else:
        case = zoo.make(name, torch.float64)
    loss_fn = case.loss_fn(reduction)
    options = {"fallback": "diagonal"}  # the sequence model's LayerNorm
    run(case.model, loss_fn, case.x, case.y, sh.EKFAC(separate_weight_and_bias=separate, **options), sh.KFLR(**options))
    blocks = reference.ggn_blocks(case.model, loss_fn, case.x, case.y)
    seen = set()
    for module_name, module in case.model.named_modules():
        folded = not separate and isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None
        for p_name, p in module.named_parameters(recurse=False):
            key = f"{module_name}.{p_name}" if module_name else p_name
            if id(p) in seen:  # a tied weight, under its first name
                continue
            seen.add(id(p))
            if folded and p_name == "bias":
                assert not hasattr(p, "ekfac")
                continue
            *bases, diagonal = p.ekfac
            block = blocks[key]
            if not bases:  # no Kronecker rule: the exact diagonal
                torch.testing.assert_close(diagonal, block.diagonal(), atol=1e-12, rtol=1e-9, msg=key)
                continue
            if folded:
                block = reference.joint_ggn_block(case.model, loss_fn, case.x, case.y, key, f"{module_name}.bias")
            torch.testing.assert_close(
                diagonal.flatten(), projected_diagonal(block, bases), atol=1e-12, rtol=1e-9, msg=key
            )
            if not folded:  # the bases diagonalize KFLR's factors
                for q, f in zip(bases, p.kflr):
                    lam = q.mT @ f @ q
                    off = lam - torch.diag_embed(lam.diagonal(dim1=-2, dim2=-1))
                    assert off.abs().max() < 1e-10, key


def test_factors_accumulate_over_backward_passes_like_grad():
    """Two micro-batches: B adds up, A becomes the mean over all examples (the full batch's factors)."""
    case = zoo.make("mlp_tanh", torch.float64)
    loss_fn = case.loss_fn("sum")
    run(case.model, loss_fn, case.x, case.y, sh.KFLR(), sh.KFACEmpirical())
    full = {
        name: [[f.clone() for f in getattr(p, a)] for a in ("kflr", "kfac_empirical")]
        for name, p in case.model.named_parameters()
    }
    case.model.zero_grad()
    with sh.extend(case.model, sh.KFLR(), sh.KFACEmpirical()):
        for part in (slice(0, 1), slice(1, None)):
            loss_fn(case.model(case.x[part]), case.y[part]).backward()
    for name, p in case.model.named_parameters():
        for got, want in zip((p.kflr, p.kfac_empirical), full[name]):
            for g, w in zip(got, want):
                torch.testing.assert_close(g, w, msg=name)
    case.model.zero_grad()
    with pytest.raises(sh.ExtensionError, match="EKFAC"), sh.extend(case.model, sh.EKFAC()):
        for part in (slice(0, 1), slice(1, None)):
            loss_fn(case.model(case.x[part]), case.y[part]).backward()
