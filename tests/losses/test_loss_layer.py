"""The loss layer shared by the engine and the function API, the option enums, the backend chooser."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import secorder_hooks as sh
from secorder_hooks import approximations, core, errors, losses
from secorder_hooks.core import FisherType
from secorder_hooks.enums import ChoiceEnum
from secorder_hooks.function_api import backend
from secorder_hooks.function_api.backend import Backend, engine_or_autograd, use_backend
from secorder_hooks.losses import LOSS_FUNCTIONS, LossKind, Reduction, averaged_terms, make_loss_call
from secorder_hooks.losses import calls as calls_module
from secorder_hooks.losses.recognition import LossWatchingMode, record_loss_calls
from tests.support import reference

DT = torch.float64


# ----------------------------------------------------------------------------- enums


@pytest.mark.parametrize(
    ("enum", "value", "member"),
    [
        (LossKind, "NLL", LossKind.NLL),
        (LossKind, " cross_entropy ", LossKind.NLL),
        (LossKind, "gaussian", LossKind.MSE),
        (LossKind, LossKind.BCE, LossKind.BCE),
        (Reduction, "Sum", Reduction.SUM),
        (FisherType, "ggn", FisherType.EXACT),
        (FisherType, "monte_carlo", FisherType.MC),
        (Backend, "generic", Backend.GENERIC),
    ],
)
def test_every_enum_parses_the_same_way(enum: type[ChoiceEnum], value: object, member: ChoiceEnum) -> None:
    assert issubclass(enum, ChoiceEnum)
    assert enum.parse(value, "arg") is member


@pytest.mark.parametrize(
    ("enum", "error", "also"),
    [
        (LossKind, errors.UnsupportedLossOptionError, NotImplementedError),
        (Reduction, errors.UnsupportedLossOptionError, NotImplementedError),
        (FisherType, errors.InvalidChoiceError, ValueError),
        (Backend, errors.InvalidChoiceError, ValueError),
    ],
)
def test_parse_errors_name_the_argument_and_the_choices(enum, error, also) -> None:
    with pytest.raises(error) as caught:
        enum.parse("bogus", "my_argument")
    assert isinstance(caught.value, (errors.SecorderError, also, ValueError))
    message = str(caught.value)
    assert "my_argument='bogus'" in message
    for member in enum:
        assert repr(member.value) in message
    for alias in enum.aliases():
        assert repr(alias) in message
    with pytest.raises(error):
        enum.parse(3, "my_argument")  # not a string: no member


def test_use_backend_parses_its_argument() -> None:
    with use_backend("ENGINE"):
        assert backend.current_backend() is Backend.ENGINE
    assert backend.current_backend() is Backend.AUTO
    with pytest.raises(errors.InvalidChoiceError, match="backend='fast'"), use_backend("fast"):
        pass


# ----------------------------------------------------------------------------- errors in one place


def test_every_exception_lives_in_errors_and_is_re_exported() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert getattr(sh, name) is cls
        assert cls.__module__ == "secorder_hooks.errors"
    assert core.FallbackWarning is errors.FallbackWarning
    assert losses.LossInputError is errors.LossInputError
    assert approximations.LossShapeError is errors.LossShapeError
    assert issubclass(errors.LossShapeError, NotImplementedError) and issubclass(errors.LossShapeError, ValueError)
    assert issubclass(errors.LossDtypeError, TypeError) and issubclass(errors.LossDtypeError, ValueError)


# ----------------------------------------------------------------------------- the registry


def test_every_recognized_loss_is_one_complete_class() -> None:
    for function, cls in LOSS_FUNCTIONS.items():
        assert cls.function is function
        for method in ("from_call", "check_targets", "averaged_terms", "sqrt_hessian"):
            assert not getattr(cls, method).__qualname__.startswith("LossTerm."), (cls, method)  # implemented
    for kind in LossKind:
        assert LOSS_FUNCTIONS[calls_module.loss_type_function(kind)].kind is kind


def _mean_cases() -> list[tuple[str, object, tuple, dict]]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 3, dtype=DT, generator=g)
    idx = torch.randint(0, 4, (6, 3), generator=g)
    idx[0, 0] = idx[2, 1] = -100
    probs = torch.softmax(torch.randn(6, 4, 3, dtype=DT, generator=g), 1)
    w4 = torch.rand(4, dtype=DT, generator=g) + 0.5
    out = torch.randn(6, 5, dtype=DT, generator=g)
    return [
        ("ce", F.cross_entropy, (logits, idx), {}),
        ("ce-weight-ignore", F.cross_entropy, (logits, idx), {"weight": w4}),
        ("ce-smoothing-weight", F.cross_entropy, (logits, idx), {"weight": w4, "label_smoothing": 0.2}),
        ("ce-probabilities", F.cross_entropy, (logits, probs), {"weight": w4}),
        ("nll-weight", F.nll_loss, (torch.log_softmax(logits, 1), idx), {"weight": w4}),
        ("mse", F.mse_loss, (out, torch.randn_like(out)), {}),
        ("mse-weight", F.mse_loss, (out, torch.randn_like(out)), {"weight": torch.rand_like(out)}),
        ("bce-weights", F.binary_cross_entropy_with_logits, (out, torch.rand_like(out)), {"pos_weight": w4[:1]}),
    ]


@pytest.mark.parametrize(("name", "fn", "args", "kwargs"), _mean_cases(), ids=[c[0] for c in _mean_cases()])
def test_averaged_terms_is_what_torch_divides_by(name, fn, args, kwargs) -> None:
    """``mean = sum / averaged_terms`` for every recognized loss: one definition of c, checked against torch."""
    mean = fn(*args, **kwargs, reduction="mean")
    total = fn(*args, **kwargs, reduction="sum")
    call = make_loss_call(fn, args, {**kwargs, "reduction": "mean"}, mean)
    torch.testing.assert_close(mean * averaged_terms(call), total, rtol=1e-12, atol=1e-12)
    assert averaged_terms(make_loss_call(fn, args, {**kwargs, "reduction": "sum"}, total)) == 1.0
    torch.testing.assert_close(losses.reduction_factor(call), float(mean / total), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend_", [Backend.ENGINE, Backend.GENERIC], ids=lambda b: b.value)
def test_empirical_fisher_of_weighted_mse_uses_the_weighted_mean(backend_: Backend) -> None:
    """``F.mse_loss(weight=w)`` averages over sum(w): L = c sum_n l_n with c = 1/sum(w)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=DT), torch.randn(5, 2, dtype=DT)
    w = torch.rand(5, 2, dtype=DT) + 0.1

    def loss_fn(out, target):
        return F.mse_loss(out, target, weight=w)

    out = model(x)
    c = 1 / w.sum()
    torch.testing.assert_close(loss_fn(out, y), c * (w * (out - y) ** 2).sum())  # the definition of c
    pe = reference.per_example_grads(model, loss_fn, x, y)  # c * grad l_n
    expected = [(g**2).sum(0) / c for g in pe.values()]
    with use_backend(backend_):
        found = sh.empirical_fisher_diagonal(model, loss_fn, x, y)
    for a, e in zip(found, expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_class_index_range_of_loss_type_targets() -> None:
    model = nn.Linear(3, 4).double()
    x = torch.randn(5, 3, dtype=DT)
    with pytest.raises(errors.LossShapeError, match=r"\[0, 4\).*\[0, 4\]"):
        sh.generalized_fisher_diagonal(model, model(x), torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(errors.LossShapeError, match=r"\[-1, 3\]"):
        sh.generalized_fisher_diagonal(model, model(x), torch.tensor([0, 1, -1, 3, -100]))
    ignored = torch.tensor([0, 1, -100, 3, 2])  # ignore_index is not a class
    found = sh.generalized_fisher_diagonal(model, model(x), ignored, reduction="sum")
    expected = reference.ggn_diagonal(model, nn.CrossEntropyLoss(reduction="sum"), x, ignored)
    for a, e in zip(found, expected.values()):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- one parse, one mode


def test_the_engine_path_parses_each_loss_call_once_with_one_mode(monkeypatch) -> None:
    parsed, modes = [], []
    original = make_loss_call

    def counting(*args, **kwargs):
        parsed.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr("secorder_hooks.losses.recognition.make_loss_call", counting)

    def loss_fn(out, target):
        stack = torch.overrides._get_current_function_mode_stack()
        modes.append([type(m).__name__ for m in stack if isinstance(m, LossWatchingMode)])
        return F.cross_entropy(out, target)

    model = nn.Linear(3, 4).double()
    x, y = torch.randn(5, 3, dtype=DT), torch.randint(0, 4, (5,))
    for fn in (sh.empirical_fisher_diagonal, sh.model_hessian_diagonal, sh.per_layer_hessian_diagonal):
        parsed.clear()
        modes.clear()
        with use_backend(Backend.ENGINE):
            fn(model, loss_fn, x, y)
        assert parsed == [F.cross_entropy], fn
        assert modes == [["EngineMode"]], fn


def test_record_loss_calls_checks_and_nests_without_a_second_mode() -> None:
    x, y = torch.randn(4, 3, dtype=DT, requires_grad=True), torch.randn(4, 3, dtype=DT)
    with record_loss_calls() as outer:
        with record_loss_calls() as inner:
            depth = len(torch.overrides._get_current_function_mode_stack())
            loss = F.mse_loss(x, y)
        with pytest.raises(errors.LossInputError, match="shapes must be equal"):
            F.mse_loss(x, y[:, :1])
    assert depth == 1
    assert [c.result for c in inner] == [c.result for c in outer] == [loss]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the broadcast
        assert F.mse_loss(x, y[:, :1]).shape == ()  # outside a block: no check, PyTorch's own behaviour


# ----------------------------------------------------------------------------- the chooser


def test_engine_or_autograd() -> None:
    def declined():
        raise sh.UnsupportedOperationError("simulated")

    with pytest.warns(sh.FallbackWarning, match="caller: the engine declined .*simulated") as caught:
        assert engine_or_autograd("caller", declined, lambda: "autograd") == "autograd"
    assert caught[0].filename == __file__  # points at the caller outside the package
    assert engine_or_autograd("caller", lambda: "engine", lambda: "autograd") == "engine"
    assert engine_or_autograd("caller", lambda: None, lambda: "autograd") == "autograd"  # not applicable: no warning
    assert engine_or_autograd("caller", None, lambda: "autograd") == "autograd"
    with use_backend(Backend.GENERIC):
        assert engine_or_autograd("caller", lambda: "engine", lambda: "autograd") == "autograd"
    with use_backend(Backend.ENGINE), pytest.raises(sh.UnsupportedOperationError):
        engine_or_autograd("caller", declined, lambda: "autograd")
    with pytest.raises(sh.NonStandardLossError):
        engine_or_autograd(
            "caller",
            lambda: (_ for _ in ()).throw(sh.NonStandardLossError("x")),
            lambda: 0,
            propagate=(sh.NonStandardLossError,),
        )
    with pytest.raises(KeyError):  # not an engine error: the user's
        engine_or_autograd("caller", lambda: {}["missing"], lambda: "autograd")
