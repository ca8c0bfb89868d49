"""Curvature quantities of the engine against brute force (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder_hooks as sh
from secorder_hooks.engine import columns, curvature
from tests.support import reference, zoo

GGN = (sh.DiagGGNExact(), sh.BatchDiagGGNExact())
HESSIAN = (sh.DiagHessian(), sh.BatchDiagHessian())
# Models whose exact Hessian needs a second-order term the engine refuses, with the op it names.
HESSIAN_REFUSED: dict[str, str] = {}


def run(model, loss_fn, x, y, *quantities, **options):
    model.zero_grad()
    with sh.extend(model, *quantities, **options):
        loss = loss_fn(model(x), y)
        loss.backward()
    return loss


def assert_matches(model, attribute, expected, atol=1e-10):
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(getattr(p, attribute), expected[name], atol=atol, rtol=1e-8, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_ggn_on_zoo(name, reduction):
    case = zoo.make(name, torch.float64)
    loss_fn = case.loss_fn(reduction)
    run(case.model, loss_fn, case.x, case.y, *GGN)
    assert_matches(case.model, "diag_ggn_exact", reference.ggn_diagonal(case.model, loss_fn, case.x, case.y))
    per_example = reference.ggn_diagonal(case.model, loss_fn, case.x, case.y, per_example=True)
    assert_matches(case.model, "diag_ggn_exact_batch", per_example)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_hessian_on_zoo(name, reduction):
    case = zoo.make(name, torch.float64)
    loss_fn = case.loss_fn(reduction)
    if name in HESSIAN_REFUSED:
        with pytest.raises(sh.UnsupportedOperationError, match=HESSIAN_REFUSED[name]):
            run(case.model, loss_fn, case.x, case.y, *HESSIAN)
        return
    run(case.model, loss_fn, case.x, case.y, *HESSIAN)
    assert_matches(case.model, "diag_h", reference.hessian_diagonal(case.model, loss_fn, case.x, case.y))
    per_example = reference.per_example_hessian_diagonal(case.model, loss_fn, case.x, case.y)
    assert_matches(case.model, "diag_h_batch", per_example)


class Curvy(nn.Module):
    """Functional activations of every supported kind, a product of activations, a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 4)

    def forward(self, x):
        h = F.elu(self.a(x))
        h = h + F.silu(self.b(h)) * torch.tanh(h) + F.softplus(h) - F.logsigmoid(h) + F.mish(h) + F.selu(h)
        h = F.celu(h) + torch.sigmoid(h) * h + F.gelu(h, approximate="tanh")
        return self.c(h)


CLASS_WEIGHT = torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
LOSSES = {
    "ce_weight_smoothing": (
        lambda: torch.randint(0, 4, (5,)),
        lambda o, y, r: F.cross_entropy(o, y, weight=CLASS_WEIGHT, label_smoothing=0.1, reduction=r),
    ),
    "ce_ignore_index": (lambda: torch.tensor([0, 1, -100, 3, 1]), lambda o, y, r: F.cross_entropy(o, y, reduction=r)),
    "nll_log_softmax": (
        lambda: torch.randint(0, 4, (5,)),
        lambda o, y, r: F.nll_loss(F.log_softmax(o, 1), y, reduction=r),
    ),
    "mse": (lambda: torch.randn(5, 4), lambda o, y, r: F.mse_loss(o, y, reduction=r)),
    "bce": (lambda: torch.rand(5, 4).round(), lambda o, y, r: F.binary_cross_entropy_with_logits(o, y, reduction=r)),
    "scaled": (lambda: torch.randint(0, 4, (5,)), lambda o, y, r: 2.5 * F.cross_entropy(o, y, reduction=r)),
    "custom": (lambda: torch.randn(5, 4), lambda o, y, r: getattr(((o - y) ** 4 + torch.cosh(o)), r)()),
    "none_then_mean": (
        lambda: torch.randint(0, 4, (5,)),
        lambda o, y, r: getattr(F.cross_entropy(o, y, reduction="none"), r)(),
    ),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss", list(LOSSES))
def test_losses_and_curved_functional_ops(loss, reduction):
    torch.manual_seed(0)
    model, x = Curvy().double(), torch.randn(5, 3, dtype=torch.float64)
    make_target, fn = LOSSES[loss]
    y = make_target()
    y = y.double() if y.is_floating_point() else y

    def loss_fn(o, t):
        return fn(o, t, reduction)

    run(model, loss_fn, x, y, *GGN, *HESSIAN, sh.SumGradSquared())
    assert_matches(model, "diag_ggn_exact", reference.ggn_diagonal(model, loss_fn, x, y))
    assert_matches(model, "diag_h", reference.hessian_diagonal(model, loss_fn, x, y))
    assert_matches(model, "diag_h_batch", reference.per_example_hessian_diagonal(model, loss_fn, x, y))


class SequenceTagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin, self.out = nn.Embedding(7, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, tokens):
        return self.out(torch.tanh(self.lin(self.emb(tokens))))


@pytest.mark.parametrize("layout", ["flattened", "class_dim_1"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sequence_outputs(layout, reduction):
    """[N, T, C] outputs: each example's positions must not share curvature columns."""
    torch.manual_seed(0)
    model, tokens, y = SequenceTagger().double(), torch.randint(0, 7, (4, 6)), torch.randint(0, 3, (4, 6))

    def loss_fn(o, t):
        if layout == "flattened":
            return F.cross_entropy(o.reshape(-1, 3), t.reshape(-1), reduction=reduction)
        return F.cross_entropy(o.transpose(1, 2), t, reduction=reduction)

    run(model, loss_fn, tokens, y, *GGN, *HESSIAN)
    assert_matches(model, "diag_ggn_exact_batch", reference.ggn_diagonal(model, loss_fn, tokens, y, per_example=True))
    assert_matches(model, "diag_h_batch", reference.per_example_hessian_diagonal(model, loss_fn, tokens, y))


class ModifiedAfterUse(nn.Module):
    """The input of a Linear with a frozen weight is modified in place after the call."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(3, 4), nn.Linear(4, 2)
        self.second.weight.requires_grad_(False)

    def forward(self, x):
        a = -self.first(x)  # saves nothing, so a may be modified once the second layer has used it
        out = self.second(a)
        a.exp_()  # a's node is now this exp, which the second layer did not consume
        return out


def spy_on_chains(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """One entry per column pass from now on: True if a chain carried the columns, False if autograd did."""
    outcomes: list[bool] = []
    run_chain, batched_grad = columns._run_chain, columns.batched_grad

    def chained(*args):
        block = run_chain(*args)
        if block is not None:
            outcomes.append(True)
        return block

    def by_autograd(*args, **kwargs):
        outcomes.append(False)
        return batched_grad(*args, **kwargs)

    monkeypatch.setattr(columns, "_run_chain", chained)
    monkeypatch.setattr(columns, "batched_grad", by_autograd)
    return outcomes


@pytest.mark.parametrize(
    ("name", "chained"),
    [
        ("mlp_relu", True),
        ("mlp_sigmoid", True),
        ("deep_mlp", True),
        ("frozen", True),
        ("cnn", True),
        ("resnet_block", False),
        ("functional", False),
    ],
)
def test_columns_through_chains_without_autograd(monkeypatch: pytest.MonkeyPatch, name: str, chained: bool) -> None:
    """Chains of Linear/conv layers and one-input nodes take the fast path; its columns equal autograd's."""
    outcomes = spy_on_chains(monkeypatch)
    case = zoo.make(name, torch.float64)
    loss_fn = case.loss_fn("sum")
    run(case.model, loss_fn, case.x, case.y, *GGN, *HESSIAN)
    assert outcomes and all(outcome == chained for outcome in outcomes)
    fast = {k: (p.diag_ggn_exact_batch, p.diag_h_batch) for k, p in case.model.named_parameters() if p.requires_grad}
    monkeypatch.setattr(columns, "_run_chain", lambda *args: None)
    run(case.model, loss_fn, case.x, case.y, *GGN, *HESSIAN)
    for k, p in case.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.diag_ggn_exact_batch, fast[k][0], atol=1e-12, rtol=1e-10)
            torch.testing.assert_close(p.diag_h_batch, fast[k][1], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_chain_through_in_place_activations(monkeypatch: pytest.MonkeyPatch, reduction: str) -> None:
    """ReLU(inplace=True) rewrites a layer's output after it was recorded; the chain still applies and is exact."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(inplace=True), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))

    def loss_fn(o, t):
        return F.cross_entropy(o, t, reduction=reduction)

    outcomes = spy_on_chains(monkeypatch)
    run(model, loss_fn, x, y, *GGN, *HESSIAN)
    assert outcomes and all(outcomes)
    assert_matches(model, "diag_ggn_exact_batch", reference.ggn_diagonal(model, loss_fn, x, y, per_example=True))
    assert_matches(model, "diag_h", reference.hessian_diagonal(model, loss_fn, x, y))


def test_chain_leaves_many_columns_through_pooling_to_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_NODE_CALLS columns, a node that is not elementwise ends the chain (autograd batches them)."""
    monkeypatch.setattr(columns, "MAX_NODE_CALLS", 1)
    outcomes = spy_on_chains(monkeypatch)
    case = zoo.make("cnn", torch.float64)
    loss_fn = case.loss_fn("mean")
    run(case.model, loss_fn, case.x, case.y, sh.DiagGGNExact())
    assert outcomes == [False]
    assert_matches(case.model, "diag_ggn_exact", reference.ggn_diagonal(case.model, loss_fn, case.x, case.y))


class Cube(torch.autograd.Function):
    """A user's autograd.Function between two layers."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x**3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


class CubeModule(nn.Module):
    def forward(self, x):
        return Cube.apply(x)


def test_chain_leaves_a_users_autograd_function_to_autograd(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(3, 4).double(), nn.Linear(4, 2).double()
    model = nn.Sequential(first, CubeModule(), second)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    outcomes = spy_on_chains(monkeypatch)
    run(model, F.mse_loss, x, y, *GGN)
    assert outcomes == [False]
    assert_matches(model, "diag_ggn_exact", reference.ggn_diagonal(model, F.mse_loss, x, y))


def test_chain_stops_at_an_input_modified_after_the_call():
    torch.manual_seed(0)
    model, x, y = ModifiedAfterUse().double(), torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2).double()
    run(model, F.mse_loss, x, y, *GGN)
    assert_matches(model, "diag_ggn_exact", reference.ggn_diagonal(model, F.mse_loss, x, y))


def test_chunked_columns_give_the_same_result():
    case = zoo.make("mlp_sigmoid", torch.float64)
    loss_fn = case.loss_fn("mean")
    run(case.model, loss_fn, case.x, case.y, *GGN, *HESSIAN)
    full = {k: (p.diag_ggn_exact_batch, p.diag_h_batch) for k, p in case.model.named_parameters()}
    run(case.model, loss_fn, case.x, case.y, *GGN, *HESSIAN, column_chunk_size=1)
    for k, p in case.model.named_parameters():
        torch.testing.assert_close(p.diag_ggn_exact_batch, full[k][0])
        torch.testing.assert_close(p.diag_h_batch, full[k][1])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("single_column_bytes", [0, 2**62], ids=["looped", "vectorized"])
def test_default_column_chunking_is_exact(
    monkeypatch: pytest.MonkeyPatch, single_column_bytes: int, reduction: str
) -> None:
    """Above SINGLE_COLUMN_BYTES of activations per column, columns go one at a time by default."""
    monkeypatch.setattr(curvature, "SINGLE_COLUMN_BYTES", single_column_bytes)
    sizes: list[int | None] = []
    split = curvature._split
    monkeypatch.setattr(curvature, "_split", lambda sqrt, size: sizes.append(size) or split(sqrt, size))
    case = zoo.make("resnet_block", torch.float64)
    loss_fn = case.loss_fn(reduction)
    run(case.model, loss_fn, case.x, case.y, *GGN)
    assert sizes == [1 if single_column_bytes == 0 else None]
    assert_matches(
        case.model,
        "diag_ggn_exact_batch",
        reference.ggn_diagonal(case.model, loss_fn, case.x, case.y, per_example=True),
    )


def test_first_and_second_order_in_one_backward():
    case = zoo.make("resnet_block", torch.float64)
    loss_fn = case.loss_fn("mean")
    loss = run(case.model, loss_fn, case.x, case.y, sh.BatchGrad(), sh.Variance(), *GGN, *HESSIAN)
    grads = torch.autograd.grad(loss_fn(case.model(case.x), case.y), list(case.model.parameters()))
    for p, g in zip(case.model.parameters(), grads):
        torch.testing.assert_close(p.grad, g)
        torch.testing.assert_close(p.grad_batch.sum(0), g)
        assert p.diag_h.shape == p.diag_ggn_exact.shape == p.shape
    assert loss.ndim == 0


@pytest.mark.parametrize("per_example", [False, True], ids=["summed", "per_example"])
def test_hessian_without_residual_terms_is_not_an_alias_of_the_ggn(per_example):
    """On a ReLU network the Hessian diagonal equals the GGN's, yet each attribute owns its tensor."""
    case = zoo.make("mlp_relu", torch.float64)
    if per_example:
        ggn, hessian = sh.BatchDiagGGNExact(), sh.BatchDiagHessian()
    else:
        ggn, hessian = sh.DiagGGNExact(), sh.DiagHessian()
    run(case.model, case.loss_fn("sum"), case.x, case.y, ggn, hessian)
    for p in case.model.parameters():
        g, h = getattr(p, ggn.attribute), getattr(p, hessian.attribute)
        torch.testing.assert_close(h, g)
        assert h.untyped_storage().data_ptr() != g.untyped_storage().data_ptr()


@pytest.mark.parametrize("name", ["mlp_tanh", "cnn"])
def test_monte_carlo_fisher_is_unbiased(name):
    case = zoo.make(name, torch.float64)
    loss_fn = case.loss_fn("mean")
    exact = reference.ggn_diagonal(case.model, loss_fn, case.x, case.y)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(100):
        run(case.model, loss_fn, case.x, case.y, sh.DiagGGNMC(mc_samples=16, generator=generator))
        samples.append(torch.cat([p.diag_ggn_mc.flatten() for p in case.model.parameters()]))
    samples = torch.stack(samples)
    expected = torch.cat([exact[k].flatten() for k, _ in case.model.named_parameters()])
    standard_error = samples.std(0) / len(samples) ** 0.5
    assert ((samples.mean(0) - expected).abs() <= 5 * standard_error + 1e-12).all()


def test_monte_carlo_fisher_is_reproducible_and_scaled():
    case = zoo.make("mlp_relu", torch.float64)
    loss_fn = case.loss_fn("sum")

    def sample(m, seed):
        run(
            case.model,
            loss_fn,
            case.x,
            case.y,
            sh.DiagGGNMC(mc_samples=m, generator=torch.Generator().manual_seed(seed)),
        )
        return [p.diag_ggn_mc.clone() for p in case.model.parameters()]

    for a, b in zip(sample(3, 1), sample(3, 1)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any((a - b).abs().max() > 0 for a, b in zip(sample(1, 1), sample(1, 2)))
    # M samples average (not sum) their outer products: with many samples the scale matches the exact GGN.
    exact = reference.ggn_diagonal(case.model, loss_fn, case.x, case.y)
    many = sample(20000, 3)
    total = sum(m.sum() for m in many)
    assert torch.isclose(total, sum(e.sum() for e in exact.values()), rtol=0.05)


def test_monte_carlo_needs_a_likelihood():
    case = zoo.make("mlp_relu", torch.float64)
    with pytest.raises(sh.UnsupportedLossError, match="Monte-Carlo"):
        run(case.model, lambda o, y: (o**4).mean(), case.x, case.y, sh.DiagGGNMC())


def test_penalty_through_parameter_is_refused():
    case = zoo.make("mlp_relu", torch.float64)
    weight = case.model[0].weight if isinstance(case.model, nn.Sequential) else next(case.model.parameters())
    with pytest.raises(sh.SecorderError, match="penalty"):
        run(case.model, lambda o, y: F.cross_entropy(o, y) + weight.square().sum(), case.x, case.y, *GGN)


class RowWise(nn.Module):
    """Softmax, log-softmax, layer and group norm between layers."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 2)
        self.norm, self.groups = nn.LayerNorm(6), nn.GroupNorm(2, 6)

    def forward(self, x):
        h = self.norm(self.a(x))
        h = torch.softmax(self.b(h), dim=1) + F.log_softmax(h, dim=-1)
        return self.c(self.groups(h))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_rowwise_curved_ops(reduction):
    torch.manual_seed(0)
    model, x, y = RowWise().double(), torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))

    def loss_fn(o, t):
        return F.cross_entropy(o, t, reduction=reduction)

    run(model, loss_fn, x, y, *HESSIAN, column_chunk_size=7)
    assert_matches(model, "diag_h", reference.hessian_diagonal(model, loss_fn, x, y))
    assert_matches(model, "diag_h_batch", reference.per_example_hessian_diagonal(model, loss_fn, x, y))


def test_unsupported_curved_op_is_named():
    class Atan(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.atan(self.a(x)))

    model, x, y = Atan().double(), torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    run(model, F.cross_entropy, x, y, *GGN)  # the GGN needs no second derivatives
    with pytest.raises(sh.UnsupportedOperationError, match=r"AtanBackward0.*'a\.bias'"):
        run(model, F.cross_entropy, x, y, *HESSIAN)


def test_float32_matches_float64():
    case64 = zoo.make("mlp_gelu", torch.float64)
    case32 = zoo.make("mlp_gelu", torch.float32)
    for case in (case32, case64):
        run(case.model, case.loss_fn("mean"), case.x, case.y, *HESSIAN)
    for p32, p64 in zip(case32.model.parameters(), case64.model.parameters()):
        torch.testing.assert_close(p32.diag_h, p64.diag_h.float(), atol=1e-5, rtol=1e-4)
