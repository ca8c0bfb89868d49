"""The function API (issue 4): Hessian diagonals and per-layer curvature against brute force."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.func import hessian

from secorder_hooks import (
    FallbackWarning,
    UnsupportedOperationError,
    get_layer_curvature_stats,
    hessian_diagonal,
    model_hessian_diagonal,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)
from secorder_hooks.function_api.backend import ENGINE_ERRORS, Backend, use_backend
from tests.support import reference
from tests.support.checks import assert_all_close
from tests.support.zoo import make

ZOO_CASES = ["mlp_relu", "mlp_sigmoid", "mlp_tanh", "deep_mlp", "cnn", "functional", "frozen", "sequence"]
BACKENDS = [Backend.GENERIC, Backend.ENGINE, Backend.AUTO]


def _full(case, ref: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Reference aligned with model.parameters(), zeros for frozen parameters."""
    return [ref[k] if k in ref else torch.zeros_like(p) for k, p in case.model.named_parameters()]


# ----------------------------------------------------------------------------- hessian_diagonal
def test_doc_example_quadratic_form() -> None:
    a = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    diag = hessian_diagonal(lambda: x @ a @ x, [x])
    assert repr(diag[0]) == "tensor([4., 6.])"


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_hessian_diagonal_matches_torch_func(chunk_size) -> None:
    a = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)

    def f(a, b):
        return (torch.sin(a) @ torch.ones(4, dtype=a.dtype)).prod() * (b**3).sum() + (a.sum() * b).tanh().sum()

    diag = hessian_diagonal(lambda: f(a, b), [a, b], chunk_size=chunk_size)
    h = hessian(f, argnums=(0, 1))(a.detach(), b.detach())
    assert_all_close(diag, [h[0][0].reshape(12, 12).diagonal().reshape(3, 4), h[1][1].diagonal()])


def test_hessian_diagonal_v_scales_elementwise() -> None:
    x = torch.randn(6, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, dtype=torch.float64)
    diag = hessian_diagonal(lambda: (x**4).sum() + x.prod(), [x])[0]
    scaled = hessian_diagonal(lambda: (x**4).sum() + x.prod(), [x], v=[v])[0]
    torch.testing.assert_close(diag, 12 * x.detach() ** 2)
    torch.testing.assert_close(scaled, v * diag)


def test_hessian_diagonal_create_graph_is_differentiable() -> None:
    x = torch.randn(5, dtype=torch.float64, requires_grad=True)
    (diag,) = hessian_diagonal(lambda: (x**4).sum(), [x], create_graph=True)
    assert diag.requires_grad
    (g,) = torch.autograd.grad(diag.sum(), x)
    torch.testing.assert_close(g, 24 * x.detach())
    (plain,) = hessian_diagonal(lambda: (x**4).sum(), [x])
    assert not plain.requires_grad


def test_hessian_diagonal_strict_and_non_strict() -> None:
    x = torch.randn(3, requires_grad=True)
    unused = torch.randn(2, requires_grad=True)
    frozen = torch.randn(4)
    linear = torch.randn(3, requires_grad=True)  # influences the result, zero Hessian
    diag = hessian_diagonal(lambda: (x**2).sum() + (linear * 2).sum(), [x, unused, frozen, linear])
    torch.testing.assert_close(diag[0], torch.full((3,), 2.0))
    for d, p in zip(diag[1:], (unused, frozen, linear)):
        assert torch.equal(d, torch.zeros_like(p))
    with pytest.raises(ValueError, match="does not influence"):
        hessian_diagonal(lambda: (x**2).sum(), [x, unused], strict=True)
    with pytest.raises(ValueError, match="does not require grad"):
        hessian_diagonal(lambda: (x**2).sum(), [x, frozen], strict=True)
    # strict accepts a parameter with a zero Hessian block
    hessian_diagonal(lambda: (x**2).sum() + linear.sum(), [x, linear], strict=True)


def test_hessian_diagonal_progress_bar(capsys) -> None:
    x = torch.randn(10, requires_grad=True)
    hessian_diagonal(lambda: (x**3).sum(), [x], progress=True, chunk_size=3)
    err = capsys.readouterr().err
    assert "10/10" in err or "10/10" in err.replace(" ", "")


def test_hessian_diagonal_is_vectorized() -> None:
    """Few batched backward calls, not one per element."""
    x = torch.randn(300, dtype=torch.float64, requires_grad=True)
    calls = 0
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        nonlocal calls
        calls += 1
        return original(*args, **kwargs)

    torch.autograd.grad = counting
    try:
        hessian_diagonal(lambda: (x.sin() * x).sum(), [x])
    finally:
        torch.autograd.grad = original
    assert calls <= 3


# ----------------------------------------------------------------------------- model_hessian_diagonal
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
@pytest.mark.parametrize("name", ZOO_CASES)
def test_model_hessian_diagonal_zoo(name: str, backend: Backend) -> None:
    case = make(name, torch.float64)
    loss_fn = case.loss_fn("mean")
    expected = _full(case, reference.hessian_diagonal(case.model, loss_fn, case.x, case.y))
    with use_backend(backend), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FallbackWarning)
        try:
            diag = model_hessian_diagonal(case.model, loss_fn, case.x, case.y)
        except ENGINE_ERRORS as err:
            assert backend is Backend.ENGINE
            pytest.skip(f"the engine declines this model: {err}")
    fell_back = any(issubclass(w.category, FallbackWarning) for w in caught)
    assert not fell_back or backend is Backend.AUTO
    assert_all_close(diag, expected)


@pytest.mark.parametrize("backend", [Backend.GENERIC, Backend.ENGINE], ids=lambda b: b.value)
def test_model_hessian_diagonal_keeps_grad_and_attributes(backend: Backend) -> None:
    case = make("mlp_tanh", torch.float64)
    before = [torch.full_like(p, 7.0) for p in case.model.parameters()]
    for p, g in zip(case.model.parameters(), before):
        p.grad = g
    with use_backend(backend):
        model_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y)
    for p, g in zip(case.model.parameters(), before):
        assert p.grad is g and torch.equal(g, torch.full_like(p, 7.0))
        assert not hasattr(p, "diag_h")


def test_model_hessian_diagonal_create_graph() -> None:
    case = make("mlp_sigmoid", torch.float64)
    diag = model_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y, create_graph=True)
    assert diag[0].requires_grad  # first-layer weights: the diagonal depends on the parameters
    assert_all_close(
        [d.detach() for d in diag], _full(case, reference.hessian_diagonal(case.model, case.loss_fn(), case.x, case.y))
    )


def test_model_hessian_diagonal_strict_frozen() -> None:
    case = make("frozen", torch.float64)
    with pytest.raises(ValueError, match="does not require grad"):
        model_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y, strict=True)


def test_model_hessian_diagonal_falls_back_with_warning(monkeypatch) -> None:
    import secorder_hooks.function_api.hessian as engine_module

    def declined(*args, **kwargs):
        raise UnsupportedOperationError("simulated: second derivative of some op unknown")

    monkeypatch.setattr(engine_module, "run_engine", declined)
    case = make("mlp_sigmoid", torch.float64)
    with pytest.warns(FallbackWarning, match="simulated"):
        diag = model_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y)
    assert_all_close(diag, _full(case, reference.hessian_diagonal(case.model, case.loss_fn(), case.x, case.y)))
    with use_backend(Backend.ENGINE), pytest.raises(UnsupportedOperationError):
        model_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y)


# ----------------------------------------------------------------------------- per-layer
def _regrouped(model: nn.Module, layer_types, full: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return {
        name: torch.cat([full[index[id(p)]].reshape(-1) for p in m.parameters(recurse=False)])
        for name, m in model.named_modules()
        if isinstance(m, layer_types) and list(m.parameters(recurse=False))
    }


@pytest.mark.parametrize("name", ["cnn", "deep_mlp", "frozen"])
def test_per_layer_hessian_is_full_result_regrouped(name: str) -> None:
    case = make(name, torch.float64)
    full = _full(case, reference.hessian_diagonal(case.model, case.loss_fn(), case.x, case.y))
    blocks = per_layer_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y)
    expected = _regrouped(case.model, (nn.Linear, nn.Conv2d), full)
    assert list(blocks) == list(expected) and blocks
    assert_all_close(list(blocks.values()), list(expected.values()))


def test_per_layer_layer_types_and_empty_selection() -> None:
    case = make("cnn", torch.float64)
    only_conv = per_layer_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y, layer_types=[nn.Conv2d])
    assert list(only_conv) == ["0", "3"]
    assert per_layer_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y, layer_types=nn.LSTM) == {}
    with pytest.raises(TypeError, match="layer_types"):
        per_layer_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y, layer_types=["Linear"])


@pytest.mark.parametrize("fisher_type", ["empirical", "exact", "ggn"])
@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.value)
def test_per_layer_fisher_is_full_result_regrouped(fisher_type: str, backend: Backend) -> None:
    case = make("deep_mlp", torch.float64)
    loss_fn = case.loss_fn()
    if fisher_type == "empirical":
        pe = reference.per_example_grads(case.model, loss_fn, case.x, case.y)
        full = [(g**2).sum(0) * case.x.shape[0] for g in pe.values()]
    else:
        full = list(reference.ggn_diagonal(case.model, loss_fn, case.x, case.y).values())
    with use_backend(backend):
        blocks = per_layer_fisher_diagonal(case.model, loss_fn, case.x, case.y, fisher_type=fisher_type)
    expected = _regrouped(case.model, nn.Linear, full)
    assert_all_close(list(blocks.values()), list(expected.values()))


def test_per_layer_fisher_exact_for_a_custom_loss() -> None:
    """The generic path differentiates any loss summing over examples."""
    case = make("mlp_tanh", torch.float64)

    def loss_fn(out, y):
        return 3 * nn.functional.cross_entropy(out, y) + (out**4).sum()

    with use_backend(Backend.GENERIC):
        blocks = per_layer_fisher_diagonal(case.model, loss_fn, case.x, case.y, fisher_type="exact")
    full = list(reference.ggn_diagonal(case.model, loss_fn, case.x, case.y).values())
    assert_all_close(list(blocks.values()), list(_regrouped(case.model, nn.Linear, full).values()))


@pytest.mark.parametrize("backend", [Backend.GENERIC, Backend.ENGINE], ids=lambda b: b.value)
def test_per_layer_fisher_mc_is_unbiased(backend: Backend) -> None:
    case = make("mlp_tanh", torch.float64)
    gen = torch.Generator().manual_seed(0)
    with use_backend(backend):
        blocks = per_layer_fisher_diagonal(
            case.model, case.loss_fn(), case.x, case.y, fisher_type="mc", mc_samples=3000, generator=gen
        )
    full = list(reference.ggn_diagonal(case.model, case.loss_fn(), case.x, case.y).values())
    expected = _regrouped(case.model, nn.Linear, full)
    for b, e in zip(blocks.values(), expected.values()):
        torch.testing.assert_close(b, e, rtol=0.15, atol=1e-3 * e.abs().max().item())


def test_per_layer_create_graph() -> None:
    case = make("mlp_tanh", torch.float64)
    for blocks in (
        per_layer_hessian_diagonal(case.model, case.loss_fn(), case.x, case.y, create_graph=True),
        per_layer_fisher_diagonal(case.model, case.loss_fn(), case.x, case.y, create_graph=True),
    ):
        assert blocks and all(d.grad_fn is not None for d in blocks.values())


def test_unknown_fisher_type_raises_before_work() -> None:
    case = make("mlp_tanh", torch.float64)
    with pytest.raises(ValueError, match="fisher_type"):
        per_layer_fisher_diagonal(case.model, case.loss_fn(), case.x, case.y, fisher_type="kfac")


# ----------------------------------------------------------------------------- statistics
def test_layer_curvature_stats() -> None:
    stats = get_layer_curvature_stats(
        {"a": torch.tensor([[1.0, 2.0], [3.0, 4.0]]), "b": torch.tensor([-5.0]), "c": torch.tensor([0.0, -1.0])}
    )
    a, b, c = stats["a"], stats["b"], stats["c"]
    assert (a["mean"], a["max"], a["min"], a["numel"], a["sum"]) == (2.5, 4.0, 1.0, 4.0, 10.0)
    # Bessel-corrected, as tensor.std() and torch-secorder: sqrt(((1-2.5)^2 + (2-2.5)^2 + ...) / 3)
    assert a["std"] == pytest.approx((5.0 / 3.0) ** 0.5, rel=1e-6)  # float32 input
    assert a["std"] == torch.tensor([1.0, 2, 3, 4]).std().item()
    assert a["norm"] == pytest.approx(30**0.5)
    assert math.isnan(b["std"]) and b["frac_negative"] == 1.0 and b["abs_mean"] == 5.0  # one entry: undefined
    assert c["frac_zero"] == 0.5 and c["frac_negative"] == 0.5
    with pytest.raises(ValueError, match="empty"):
        get_layer_curvature_stats({"e": torch.zeros(0)})
