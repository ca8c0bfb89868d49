"""Calls whose inputs do not carry the batch on dim 0 (position embeddings on ``[1, T]`` or ``[T]`` ids,
batch-free layers, calls on a slice of the batch): exact quantities against brute force, or a clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder_hooks as sh
from tests.support import reference

V, T, D, C, N = 7, 5, 4, 3, 4
FIRST_ORDER = (sh.BatchGrad(), sh.SumGradSquared(), sh.BatchL2Grad(), sh.Variance())
SECOND_ORDER = (sh.DiagGGNExact(), sh.BatchDiagGGNExact(), sh.DiagHessian(), sh.BatchDiagHessian())


class Positions(nn.Module):
    """Token + position embeddings (positions as ``[1, T]``, ``[T]``, or expanded), tanh MLP, per-token logits.

    Args:
        positions: ``"row"`` (``[1, T]`` ids, as Hugging Face GPT-2 and BERT), ``"free"``
            (``[T]`` ids, as nanoGPT), ``"expand"`` (``[1, T]`` ids, the output expanded
            to the batch before the sum), ``"mul"`` (a ``[1, T, D]`` gate multiplying the
            tokens), ``"linear"`` (a Linear layer on a batch-free ``[T, D]`` buffer).
    """

    def __init__(self, positions: str) -> None:
        super().__init__()
        self.positions = positions
        self.tok = nn.Embedding(V, D)
        self.pos = nn.Embedding(T, D)
        self.anchor = nn.Linear(D, D)
        self.register_buffer("table", torch.randn(T, D))
        self.mix = nn.Linear(D, D)
        self.head = nn.Linear(D, C)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.tok(ids)
        row = torch.arange(t).unsqueeze(0)
        if self.positions == "row":
            h = h + self.pos(row)
        elif self.positions == "free":
            h = self.pos(torch.arange(t)) + h
        elif self.positions == "expand":
            h = h + self.pos(row).expand(ids.shape[0], -1, -1)
        elif self.positions == "mul":
            h = h * self.pos(row)
        elif self.positions == "linear":
            h = h + self.anchor(self.table[:t])
        return self.head(torch.tanh(self.mix(h)))


def lm_loss(reduction):
    return lambda logits, y: F.cross_entropy(logits.reshape(-1, C), y.reshape(-1), reduction=reduction)


def case(positions, n=N):
    torch.manual_seed(0)
    model = Positions(positions).double()
    return model, torch.randint(0, V, (n, T)), torch.randint(0, C, (n, T))


def run(model, loss_fn, x, y, *quantities):
    model.zero_grad()
    with sh.extend(model, *quantities):
        loss_fn(model(x), y).backward()


def used(model):
    return [(name, p) for name, p in model.named_parameters() if p.grad is not None]


def close(actual, expected, name):
    torch.testing.assert_close(actual, expected, atol=1e-10, rtol=1e-8, msg=name)


POSITIONS = ["row", "free", "expand", "mul", "linear"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_first_order(positions, reduction):
    model, x, y = case(positions)
    loss_fn = lm_loss(reduction)
    run(model, loss_fn, x, y, *FIRST_ORDER)
    expected = reference.per_example_grads(model, loss_fn, x, y)
    for name, p in used(model):
        g = expected[name]
        assert p.grad_batch.shape == (N, *p.shape), name  # never [1, ...] or [T, ...]
        close(p.grad_batch, g, name)
        close(p.sum_grad_squared, g.square().sum(0), name)
        close(p.batch_l2, g.flatten(1).square().sum(1), name)
        close(p.variance, g.var(0, unbiased=False), name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("positions", POSITIONS)
def test_second_order(positions, reduction):
    model, x, y = case(positions)
    loss_fn = lm_loss(reduction)
    run(model, loss_fn, x, y, *SECOND_ORDER)
    ggn = reference.ggn_diagonal(model, loss_fn, x, y, per_example=True)
    hessian = reference.per_example_hessian_diagonal(model, loss_fn, x, y)
    full = reference.hessian_diagonal(model, loss_fn, x, y)
    for name, p in used(model):
        close(p.diag_ggn_exact_batch, ggn[name], name)
        close(p.diag_ggn_exact, ggn[name].sum(0), name)
        close(p.diag_h_batch, hessian[name], name)
        close(p.diag_h, full[name], name)


def test_batch_of_one_and_batch_free_rows_equal_to_the_batch():
    """T == N: a batch-free [T, D] output is still told apart from a batch by its broadcast."""
    model, x, y = case("free", n=T)
    run(model, lm_loss("sum"), x, y, sh.BatchGrad())
    close(model.pos.weight.grad_batch, reference.per_example_grads(model, lm_loss("sum"), x, y)["pos.weight"], "pos")
    model, x, y = case("free", n=1)
    run(model, lm_loss("mean"), x, y, sh.BatchGrad(), sh.DiagGGNExact())
    assert model.pos.weight.grad_batch.shape == (1, T, D)
    close(model.pos.weight.grad_batch[0], model.pos.weight.grad, "pos")


class Keywords(nn.Module):
    """``Positions("row")`` called with keyword arguments, as Hugging Face models are."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = Positions("row")

    def forward(self, *, input_ids: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.inner(input_ids) * scale


def test_function_api_with_keyword_inputs():
    """Dict inputs are the model's keyword arguments; targets of any shape ([N, T] token labels)."""
    torch.manual_seed(0)
    model = Keywords().double()
    x, y = torch.randint(0, V, (N, T)), torch.randint(0, C, (N, T))
    loss_fn = lm_loss("mean")
    inputs = {"input_ids": x, "scale": 0.5}
    layers = (nn.Embedding, nn.Linear)
    ggn = sh.per_layer_fisher_diagonal(model, loss_fn, inputs, y, layer_types=layers, fisher_type="exact")
    expected = reference.ggn_diagonal(model, loss_fn, inputs, y)
    close(ggn["inner.pos"], expected["inner.pos.weight"].flatten(), "pos")
    empirical = sh.empirical_fisher_diagonal(model, loss_fn, inputs, y)
    grads = reference.per_example_grads(model, loss_fn, inputs, y)
    for (name, _), value in zip(model.named_parameters(), empirical):
        close(value, grads[name].square().sum(0) * (N * T), name)  # c * sum_n grad l_n^2, c = 1 / (N T)
    hessian = sh.model_hessian_diagonal(model, loss_fn, inputs, y)
    full = reference.hessian_diagonal(model, loss_fn, inputs, y)
    for (name, _), value in zip(model.named_parameters(), hessian):
        close(value, full[name], name)
    with pytest.raises(TypeError, match="dict of keyword"):
        sh.model_hessian_diagonal(model, loss_fn, {"input_ids": [1, 2]}, y)


class Misused(nn.Module):
    """Outputs whose rows are not the examples and that are not (only) broadcast over them."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "slice":  # a call on part of the batch
            return torch.cat([self.head(x[:2]), x[2:, :C]])
        pos = self.pos(torch.arange(T).unsqueeze(0))
        if self.how == "scaled":  # transformed before the broadcast
            return self.head(x + 2 * pos.sum(1, keepdim=True))
        if self.how == "twice":  # broadcast, and also reduced into the loss directly
            return self.head(x + pos) + pos.sum()
        raise ValueError(self.how)


@pytest.mark.parametrize(
    ("how", "match"),
    [
        ("slice", r"Linear 'head' was called with inputs of shapes \[\(2, 4\)\].*2 rows are not the 4 examples"),
        ("scaled", r"Embedding 'pos' was called with inputs of shapes \[\(1, 5\)\]"),
        ("twice", r"Embedding 'pos'.*also reaches the loss through"),
    ],
)
def test_rows_that_are_not_the_examples_raise(how, match):
    model = Misused(how).double()
    x = torch.randn(N, D, dtype=torch.float64) if how == "slice" else torch.randn(N, T, D, dtype=torch.float64)
    with pytest.raises(sh.UnsupportedModuleError, match=match), sh.extend(model, sh.BatchGrad()) as session:
        model(x).sum().backward()
    assert not session.watched and len(session.records) == 0
    for p in model.parameters():
        assert not hasattr(p, "grad_batch")


def test_model_called_without_batch_axis():
    """``model(x[0])``: a package error saying dim 0 must index the examples (issue 15)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    message = r"shape \(4,\) without a batch axis.*dim 0 must index"
    with pytest.raises(sh.UnsupportedModuleError, match=message), sh.extend(model, sh.BatchGrad()):
        model(x[0]).sum().backward()
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    with pytest.raises(sh.UnsupportedModuleError, match="dim 0 must index"), sh.extend(model, sh.SumGradSquared()):
        model(x[0]).sum().backward()
