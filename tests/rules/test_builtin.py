"""Built-in layer rules (Linear, Conv1d/2d/3d, Embedding, LayerNorm/RMSNorm, GroupNorm, BatchNorm eval).

Two levels, float64 throughout:

* through the engine: first-order quantities of small models against the brute-force
  per-example gradients of :mod:`tests.support.reference` (with and without ``BatchGrad``, so the
  rules' fast paths are exercised too), for both loss reductions;
* the rules directly with ``V > 1`` random output vectors: per-example gradients against a
  loop of autograd calls, and every fast path against those gradients or the Jacobian.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import secorder_hooks
from secorder_hooks import BatchGrad, BatchL2Grad, SumGradSquared, UnsupportedModuleError, Variance
from secorder_hooks.rules import linear as linear_rules
from secorder_hooks.rules import rule_for
from secorder_hooks.rules.base import ACCUMULATE_VECTORS, BULK_ELEMENTS, square_sum, trainable_parameters
from secorder_hooks.rules.conv import ConvRule
from secorder_hooks.rules.embedding import EmbeddingRule
from secorder_hooks.rules.linear import LinearRule, NormStrategy, outer_sum_squared_norms, outer_sums
from secorder_hooks.rules.norm import BatchNormEvalRule, GroupNormRule, LayerNormRule, RMSNormRule
from tests.support import reference

DT = torch.float64
N = 4


# --------------------------------------------------------------------------- helpers
class Permute(nn.Module):
    """Moves the class axis of a sequence output to dim 1, as cross-entropy expects."""

    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: Tensor) -> Tensor:
        return x.permute(*self.dims)


def randomize(model: nn.Module) -> nn.Module:
    """Random affine parameters and running statistics (defaults 1/0 would hide mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
            if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)):
                for p in m.parameters(recurse=False):
                    p.normal_()
    return model


def head(body: nn.Module, x: Tensor, classes: int = 3) -> nn.Sequential:
    """``body -> tanh -> flatten -> Linear(classes)``, the Linear sized by a dry run."""
    with torch.no_grad():
        features = body(x).flatten(1).shape[1]
    return nn.Sequential(body, nn.Tanh(), nn.Flatten(), nn.Linear(features, classes, dtype=DT))


def check_engine(model: nn.Module, x: Tensor, y: Tensor, reduction: str) -> None:
    """All first-order quantities equal those of the reference per-example gradients."""
    model = model.eval()

    def loss_fn(out: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(out, target, reduction=reduction)

    ref = reference.per_example_grads(model, loss_fn, x, y)
    params = dict(model.named_parameters())
    assert ref, "model without trainable parameters"
    with_batch = (BatchGrad(), SumGradSquared(), BatchL2Grad(), Variance())
    without_batch = (SumGradSquared(), BatchL2Grad(), Variance())  # the rules' fast paths
    for quantities in (with_batch, without_batch):
        model.zero_grad()
        for p in params.values():
            for attr in ("grad_batch", "sum_grad_squared", "batch_l2", "variance"):
                if hasattr(p, attr):
                    delattr(p, attr)
        with secorder_hooks.extend(model, *quantities):
            loss = loss_fn(model(x), y)
            loss.backward()
        for name, p in params.items():
            if not p.requires_grad:
                assert p.grad is None and not hasattr(p, "grad_batch") and not hasattr(p, "batch_l2")
                continue
            r = ref[name]
            torch.testing.assert_close(p.grad, r.sum(0))
            if any(isinstance(q, BatchGrad) for q in quantities):
                torch.testing.assert_close(p.grad_batch, r)
            else:
                assert not hasattr(p, "grad_batch")
            torch.testing.assert_close(p.sum_grad_squared, r.square().sum(0))
            torch.testing.assert_close(p.batch_l2, r.flatten(1).square().sum(1))
            torch.testing.assert_close(p.variance, r.var(0, unbiased=False))


def classes_for(shape: tuple[int, ...], classes: int = 3) -> Tensor:
    return torch.randint(0, classes, shape)


REDUCTIONS = ["mean", "sum"]


# --------------------------------------------------------------------------- engine: Linear / sequences
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_engine_linear_2d(reduction: str) -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    check_engine(model, torch.randn(N, 5, dtype=DT), classes_for((N,)), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ln_kwargs", [{}, {"bias": False}, {"elementwise_affine": False}])
def test_engine_sequence_linear_layernorm(reduction: str, ln_kwargs: dict) -> None:
    model = nn.Sequential(
        nn.Linear(5, 6), nn.LayerNorm(6, **ln_kwargs), nn.Tanh(), nn.Linear(6, 3), Permute(0, 2, 1)
    ).to(DT)
    check_engine(randomize(model), torch.randn(N, 7, 5, dtype=DT), classes_for((N, 7)), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_engine_linear_two_position_axes_rmsnorm(reduction: str) -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.RMSNorm(5), nn.Tanh(), nn.Linear(5, 3), Permute(0, 3, 1, 2)).to(DT)
    check_engine(randomize(model), torch.randn(N, 2, 3, 4, dtype=DT), classes_for((N, 2, 3)), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(
    "emb_kwargs", [{}, {"padding_idx": 0}, {"padding_idx": -1}, {"padding_idx": 2, "scale_grad_by_freq": True}]
)
def test_engine_embedding_sequence(reduction: str, emb_kwargs: dict) -> None:
    model = nn.Sequential(nn.Embedding(6, 4, **emb_kwargs), nn.LayerNorm(4), nn.Linear(4, 3), Permute(0, 2, 1))
    x = torch.randint(0, 6, (N, 9))  # small vocabulary: repeated and padding indices in every example
    check_engine(randomize(model.to(DT)), x, classes_for((N, 9)), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_engine_embedding_pooled(reduction: str) -> None:
    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 4, padding_idx=1)
            self.out = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.out(torch.tanh(self.emb(x)).mean(1))

    check_engine(Pooled().to(DT), torch.randint(0, 5, (N, 6)), classes_for((N,)), reduction)


# --------------------------------------------------------------------------- engine: convolutions
CONV_CASES = [
    pytest.param(1, {"kernel_size": 3}, id="1d"),
    pytest.param(1, {"kernel_size": 4, "stride": 2, "padding": 2, "dilation": 2}, id="1d-stride-pad-dil"),
    pytest.param(1, {"kernel_size": 4, "padding": "same", "dilation": 3}, id="1d-same-asym"),
    pytest.param(1, {"kernel_size": 3, "padding": 2, "padding_mode": "circular", "bias": False}, id="1d-circular"),
    pytest.param(2, {"kernel_size": 3, "padding": 1}, id="2d"),
    pytest.param(2, {"kernel_size": (2, 3), "stride": (2, 1), "padding": (1, 2), "dilation": (1, 2)}, id="2d-mixed"),
    pytest.param(2, {"kernel_size": 2, "padding": "same"}, id="2d-same-even"),
    pytest.param(2, {"kernel_size": 3, "padding": "valid", "groups": 2}, id="2d-valid-groups"),
    pytest.param(2, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect", "groups": 4}, id="2d-reflect-dw"),
    pytest.param(2, {"kernel_size": 3, "padding": (2, 1), "padding_mode": "replicate", "stride": 2}, id="2d-replicate"),
    pytest.param(2, {"kernel_size": 3, "padding": "same", "padding_mode": "circular"}, id="2d-same-circular"),
    pytest.param(3, {"kernel_size": 2}, id="3d"),
    pytest.param(3, {"kernel_size": (1, 2, 3), "stride": (1, 2, 1), "padding": (0, 1, 1), "groups": 2}, id="3d-mixed"),
    pytest.param(3, {"kernel_size": 3, "padding": "same", "padding_mode": "reflect", "bias": False}, id="3d-same-refl"),
    pytest.param(3, {"kernel_size": 2, "dilation": 2, "padding": 1, "padding_mode": "replicate"}, id="3d-dil-repl"),
]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (9,), 2: (6, 7), 3: (4, 5, 4)}


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize(("dim", "kwargs"), CONV_CASES)
def test_engine_conv(dim: int, kwargs: dict, reduction: str) -> None:
    x = torch.randn(N, 4, *SPATIAL[dim], dtype=DT)
    model = head(CONV[dim](4, 8, dtype=DT, **kwargs), x)
    check_engine(model, x, classes_for((N,)), reduction)


# --------------------------------------------------------------------------- engine: normalization
NORM_CASES = [
    pytest.param(lambda: (nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4)), 2, id="groupnorm"),
    pytest.param(lambda: (nn.Conv2d(2, 4, 3), nn.GroupNorm(4, 4, affine=False)), 2, id="groupnorm-no-affine"),
    pytest.param(lambda: (nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)), 1, id="batchnorm1d-seq"),
    pytest.param(lambda: (nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)), 2, id="batchnorm2d"),
    pytest.param(lambda: (nn.Conv3d(2, 4, 2), nn.BatchNorm3d(4)), 3, id="batchnorm3d"),
    pytest.param(lambda: (nn.Conv2d(2, 3, 3), nn.LayerNorm([3, 4, 5])), 2, id="layernorm-3-axes"),
]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("layers", "dim"), NORM_CASES)
def test_engine_norm_layers(layers: Callable, dim: int, reduction: str) -> None:
    x = torch.randn(N, 2, *{1: (8,), 2: (6, 7), 3: (4, 5, 4)}[dim], dtype=DT)
    model = head(randomize(nn.Sequential(*layers()).to(DT)), x)
    check_engine(model, x, classes_for((N,)), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_engine_batchnorm1d_on_features(reduction: str) -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).to(DT)
    check_engine(randomize(model), torch.randn(N, 5, dtype=DT), classes_for((N,)), reduction)


# --------------------------------------------------------------------------- engine: frozen parameters
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_engine_frozen_parameters(reduction: str) -> None:
    x = torch.randn(N, 2, 6, 6, dtype=DT)
    body = randomize(nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Conv2d(4, 3, 3)).to(DT))
    model = head(body, x)
    body[0].weight.requires_grad_(False)
    body[1].bias.requires_grad_(False)
    body[2].bias.requires_grad_(False)
    model[3].weight.requires_grad_(False)
    check_engine(model, x, classes_for((N,)), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_engine_frozen_embedding_and_layernorm_weight(reduction: str) -> None:
    model = randomize(nn.Sequential(nn.Embedding(6, 4), nn.LayerNorm(4), nn.Linear(4, 3), Permute(0, 2, 1)).to(DT))
    model[0].weight.requires_grad_(False)
    model[1].weight.requires_grad_(False)
    check_engine(model, torch.randint(0, 6, (N, 5)), classes_for((N, 5)), reduction)


# --------------------------------------------------------------------------- engine: refused configurations
@pytest.mark.parametrize(
    ("emb_kwargs", "match"), [({"max_norm": 1.0}, "max_norm"), ({"sparse": True}, "sparse")], ids=["max_norm", "sparse"]
)
def test_embedding_unsupported_options_raise(emb_kwargs: dict, match: str) -> None:
    model = nn.Sequential(nn.Embedding(6, 4, **emb_kwargs), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    with pytest.raises(UnsupportedModuleError, match=match), secorder_hooks.extend(model, BatchGrad()):
        F.cross_entropy(model(torch.randint(0, 6, (N, 3))), classes_for((N,))).backward()


def test_batchnorm_without_running_stats_raises() -> None:
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6, track_running_stats=False), nn.Linear(6, 3)).to(DT)
    model.eval()
    with pytest.raises(UnsupportedModuleError, match="track_running_stats"), secorder_hooks.extend(model, BatchGrad()):
        F.cross_entropy(model(torch.randn(N, 5, dtype=DT)), classes_for((N,))).backward()


def test_conv_unbatched_input_raises() -> None:
    conv = nn.Conv1d(2, 3, 3).to(DT)
    x = torch.randn(2, 7, dtype=DT)
    with pytest.raises(UnsupportedModuleError, match="batch dimension"):
        ConvRule().per_example_grads(conv, (x,), torch.randn(1, 3, 5, dtype=DT))


# --------------------------------------------------------------------------- rules directly, V > 1
def autograd_per_example(module: nn.Module, x: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
    """``[V, N, *p]`` by one autograd call per (vector, example): d (g_vn . out_n) / d theta."""
    params = trainable_parameters(module)
    v, n = grad_output.shape[:2]
    result: dict[str, list[Tensor]] = {k: [] for k in params}
    for i in range(v):
        for j in range(n):
            out = module(x)
            mask = (torch.arange(n) == j).reshape(n, *[1] * (out.dim() - 1))
            grads = torch.autograd.grad((out * grad_output[i] * mask).sum(), list(params.values()))
            for k, g in zip(params, grads):
                result[k].append(g)
    return {k: torch.stack(g).reshape(v, n, *params[k].shape) for k, g in result.items()}


def jacobian_curvature(module: nn.Module, x: Tensor, r: Tensor, per_example: bool) -> dict[str, Tensor]:
    r"""``sum_e r_ne (d out_ne / d theta)^2`` from the full Jacobian ``[N, *out, *p]`` (torch.func)."""
    params = {k: p.detach() for k, p in trainable_parameters(module).items()}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(module, p, (x,)))(params)
    n = r.shape[0]
    result = {}
    for k, p in params.items():
        j = jac[k].reshape(n, -1, p.numel())  # every output element belongs to one example
        curv = torch.einsum("ne,nep->np", r.reshape(n, -1), j.square()).reshape(n, *p.shape)
        result[k] = curv if per_example else curv.sum(0)
    return result


RULE_CASES = [
    pytest.param(lambda: nn.Linear(3, 4), (N, 3), LinearRule, id="linear-2d"),
    pytest.param(lambda: nn.Linear(3, 4, bias=False), (N, 5, 3), LinearRule, id="linear-seq"),
    pytest.param(lambda: nn.Linear(3, 2), (N, 2, 3, 3), LinearRule, id="linear-4d"),
    pytest.param(lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (N, 4, 9), ConvRule, id="conv1d"),
    pytest.param(
        lambda: nn.Conv2d(2, 4, (3, 2), dilation=(1, 2), padding="same", padding_mode="reflect"),
        (N, 2, 5, 6),
        ConvRule,
        id="conv2d",
    ),
    pytest.param(lambda: nn.Conv2d(8, 8, 2), (N, 8, 3, 3), ConvRule, id="conv2d-gram-regime"),
    # from GROUPED_MIN_CHANNELS input channels per group: one grouped convolution's weight gradient
    pytest.param(lambda: nn.Conv1d(16, 6, 3, stride=2, padding=1, groups=2), (N, 16, 9), ConvRule, id="conv1d-grouped"),
    pytest.param(
        lambda: nn.Conv2d(8, 4, (3, 2), stride=(2, 1), dilation=(1, 2), padding=(2, 1), padding_mode="reflect"),
        (N, 8, 6, 5),
        ConvRule,
        id="conv2d-grouped-reflect",
    ),
    pytest.param(
        lambda: nn.Conv2d(16, 4, 2, padding="same", groups=2, bias=False), (N, 16, 4, 5), ConvRule, id="conv2d-same"
    ),
    pytest.param(
        lambda: nn.Conv3d(8, 3, 2, stride=(2, 1, 1), padding=1, padding_mode="circular"),
        (N, 8, 4, 3, 3),
        ConvRule,
        id="conv3d-grouped-circular",
    ),
    pytest.param(
        lambda: nn.Conv3d(2, 2, 2, stride=(2, 1, 1), padding=1, padding_mode="circular", bias=False),
        (N, 2, 4, 3, 3),
        ConvRule,
        id="conv3d",
    ),
    pytest.param(lambda: nn.LayerNorm([3, 4]), (N, 2, 3, 4), LayerNormRule, id="layernorm"),
    pytest.param(lambda: nn.RMSNorm(4), (N, 3, 4), RMSNormRule, id="rmsnorm"),
    pytest.param(lambda: nn.GroupNorm(2, 4), (N, 4, 3, 2), GroupNormRule, id="groupnorm"),
    pytest.param(lambda: nn.BatchNorm1d(3), (N, 3), BatchNormEvalRule, id="batchnorm1d"),
    pytest.param(lambda: nn.BatchNorm2d(3), (N, 3, 2, 3), BatchNormEvalRule, id="batchnorm2d"),
    pytest.param(lambda: nn.BatchNorm3d(2), (N, 2, 2, 2, 3), BatchNormEvalRule, id="batchnorm3d"),
]
EMBEDDING_CASES = [
    pytest.param({}, (N,), id="indices-1d"),
    pytest.param({"padding_idx": 1}, (N, 6), id="padding"),
    pytest.param({"padding_idx": 0, "scale_grad_by_freq": True}, (N, 2, 4), id="freq-3d"),
]
V = 3


def check_rule(rule, module: nn.Module, x: Tensor) -> None:
    out = module(x)
    g = torch.randn(V, *out.shape, dtype=DT)
    weights = torch.randn(V, out.shape[0], dtype=DT)
    expected = autograd_per_example(module, x, g)
    assert expected, "nothing to test"
    got = rule.per_example_grads(module, (x,), g)
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])
    for w in (None, weights):
        wv = torch.ones(V, out.shape[0], dtype=DT) if w is None else w
        for per_example in (False, True):
            got = rule.weighted_squared_sum(module, (x,), g, w, per_example)
            assert got.keys() == expected.keys()
            for k, e in expected.items():
                sq = (e.square() * wv.reshape(V, -1, *[1] * (e.dim() - 2))).sum(0)
                torch.testing.assert_close(got[k], sq if per_example else sq.sum(0))
    got = rule.squared_norms(module, (x,), g)
    for k, e in expected.items():
        torch.testing.assert_close(got[k], e.flatten(2).square().sum(-1))
    r = torch.randn_like(out)
    for per_example in (False, True):
        got = rule.output_curvature(module, (x,), r, per_example)
        want = jacobian_curvature(module, x, r, per_example)
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k], want[k])


@pytest.mark.parametrize(("make", "shape", "rule_cls"), RULE_CASES)
@pytest.mark.parametrize("frozen", [None, "weight"])
def test_rule_fast_paths_agree(make: Callable, shape: tuple[int, ...], rule_cls: type, frozen: str | None) -> None:
    module = randomize(make().to(DT)).eval()
    assert isinstance(rule_for(module), rule_cls)
    if frozen is not None:
        getattr(module, frozen).requires_grad_(False)
        if not trainable_parameters(module):
            pytest.skip("no trainable parameter left")
    check_rule(rule_for(module), module, torch.randn(*shape, dtype=DT))


@pytest.mark.parametrize(("kwargs", "shape"), EMBEDDING_CASES)
def test_embedding_rule_fast_paths_agree(kwargs: dict, shape: tuple[int, ...]) -> None:
    module = nn.Embedding(5, 3, **kwargs).to(DT)
    assert isinstance(rule_for(module), EmbeddingRule)
    x = torch.randint(0, 5, shape)
    check_rule(rule_for(module), module, x)
    if module.padding_idx is not None and (x == module.padding_idx).any():
        grads = rule_for(module).per_example_grads(module, (x,), torch.randn(2, *module(x).shape, dtype=DT))
        assert grads["weight"][:, :, module.padding_idx].abs().max() == 0


def test_chunked_materialization_is_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """One vector per chunk gives the same result as one chunk."""
    module = nn.Conv2d(2, 4, 3, padding=1).to(DT)
    x = torch.randn(N, 2, 4, 4, dtype=DT)
    monkeypatch.setattr(linear_rules, "CHUNK_ELEMENTS", 1)
    check_rule(ConvRule(), module, x)
    check_rule(LinearRule(), nn.Linear(3, 2).to(DT), torch.randn(N, 5, 3, dtype=DT))


@pytest.mark.parametrize("strategy", list(NormStrategy))
@pytest.mark.parametrize(("t", "o", "i"), [(1, 3, 4), (6, 2, 3), (2, 7, 9)])
def test_outer_sum_squared_norm_strategies(strategy: NormStrategy, t: int, o: int, i: int) -> None:
    g = torch.randn(V, N, 2, t, o, dtype=DT)
    x = torch.randn(N, 2, t, i, dtype=DT)
    expected = outer_sums(g, x).square().sum((2, 3, 4))
    torch.testing.assert_close(outer_sum_squared_norms(g, x, strategy), expected)


@pytest.mark.parametrize("v", [0, 1, 3, ACCUMULATE_VECTORS, ACCUMULATE_VECTORS + 1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("width", [2, BULK_ELEMENTS], ids=["in-cache", "large"])
def test_square_sum_accumulated_and_vectorized(v, weighted, width):
    """Both paths of square_sum (one vector at a time, or all squared at once) give sum_v w_vn g_vn^2."""
    g = torch.randn(v, N, 3, width, dtype=DT)
    weights = torch.randn(v, N, dtype=DT) if weighted else None
    expected = (g.square() * (1 if weights is None else weights[:, :, None, None])).sum(0)
    torch.testing.assert_close(square_sum(g, weights), expected)


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(4, 3),
        nn.Conv1d(4, 6, 3, padding=1, stride=2),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2),
        nn.Conv2d(4, 6, 3, padding="same"),
        nn.Conv2d(4, 6, 2, stride=2),
        nn.Conv3d(4, 2, 3, padding=1),
    ],
    ids=lambda m: repr(m),
)
def test_input_vjp_against_autograd(module: nn.Module) -> None:
    """The rules' input Jacobian products for V vectors, as used by the column chains."""
    torch.manual_seed(0)
    module = module.double()
    spatial = {nn.Linear: (), nn.Conv1d: (9,), nn.Conv2d: (8, 9), nn.Conv3d: (5, 5, 5)}[type(module)]
    x = torch.randn(N, 4, *spatial, dtype=DT, requires_grad=True)
    y = module(x)
    vectors = torch.randn(3, *y.shape, dtype=DT)
    expected = torch.stack([torch.autograd.grad(y, x, v, retain_graph=True)[0] for v in vectors])
    torch.testing.assert_close(rule_for(module).input_vjp(module, (x,), vectors), expected)


def test_conv_input_vjp_declines_padding_outside_the_convolution() -> None:
    """Reflect padding (or asymmetric 'same' padding) is a separate operation: no closed form."""
    module = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect").double()
    x = torch.randn(N, 2, 5, 5, dtype=DT)
    assert rule_for(module).input_vjp(module, (x,), torch.randn(1, *module(x).shape, dtype=DT)) is None
