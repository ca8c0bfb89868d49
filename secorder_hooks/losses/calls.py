r"""The standard PyTorch loss functions the package recognizes, and what it reads from a call.

Each recognized function is registered, with :func:`standard_loss`, on the
:class:`~secorder_hooks.losses.base.LossTerm` subclass that stands for it; that class is
the one place that knows the loss: its Hessian square root, the targets it accepts and
the number of terms its mean averages. :data:`LOSS_FUNCTIONS` maps the functions to
their classes. The engine intercepts these functions (and the ``nn`` loss modules, which
call them) while a :func:`~secorder_hooks.extend` context is active, and the function API
while it evaluates ``loss_fn`` (:mod:`secorder_hooks.losses.recognition`); each call
becomes a :class:`~secorder_hooks.losses.base.LossCall`.

The reduction factor :math:`c` in :math:`L = c \sum_n \ell_n` of a call is read here and
nowhere else: :func:`averaged_terms` (:math:`1/c`) and :func:`reduction_factor`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import Tensor
from torch.nn import _reduction

from secorder_hooks.errors import LossInputError
from secorder_hooks.losses.base import LossCall, LossTerm
from secorder_hooks.losses.kinds import LossKind, Reduction

__all__ = [
    "LOSS_FUNCTIONS",
    "standard_loss",
    "loss_type_function",
    "make_loss_call",
    "averaged_terms",
    "reduction_factor",
]

_T = TypeVar("_T", bound=type[LossTerm])

LOSS_FUNCTIONS: dict[Callable[..., Tensor], type[LossTerm]] = {}
"""Every recognized loss function and the term class registered for it."""

_LOSS_TYPE_FUNCTIONS: dict[LossKind, Callable[..., Tensor]] = {}
_SIGNATURES: dict[Callable[..., Tensor], inspect.Signature] = {}
_NAMES: dict[Callable[..., Tensor], tuple[str, ...]] = {}
_DEFAULTS: dict[Callable[..., Tensor], dict[str, Any]] = {}


def standard_loss(
    function: Callable[..., Tensor], kind: LossKind | None = None, *, loss_type: bool = False
) -> Callable[[_T], _T]:
    """Class decorator: register a term class as the one for the PyTorch loss ``function``.

    The class implements :meth:`~secorder_hooks.losses.base.LossTerm.from_call`,
    :meth:`~secorder_hooks.losses.base.LossTerm.check_targets` and
    :meth:`~secorder_hooks.losses.base.LossTerm.averaged_terms`; from then on the engine
    and the function API recognize calls of ``function`` (and of the ``nn`` modules that
    call it).

    Args:
        function: A loss function of ``torch.nn.functional`` taking ``(input, target, ...)``
            with positional-or-keyword parameters.
        kind: Its likelihood, if one of :class:`~secorder_hooks.losses.kinds.LossKind`.
        loss_type: Whether the function API's ``loss_type=kind`` computes its loss with
            ``function`` (one function per kind).
    """
    if loss_type and (kind is None or kind in _LOSS_TYPE_FUNCTIONS):
        raise LossInputError(f"loss_type=True needs a kind without a loss_type function yet, got {kind!r}.")

    def register(cls: _T) -> _T:
        cls.function, cls.kind = function, kind
        LOSS_FUNCTIONS[function] = cls
        signature = inspect.signature(function)
        _SIGNATURES[function] = signature
        _NAMES[function] = tuple(signature.parameters)
        _DEFAULTS[function] = {
            name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty
        }
        if loss_type:
            _LOSS_TYPE_FUNCTIONS[kind] = function
        return cls

    return register


def loss_type_function(kind: LossKind) -> Callable[..., Tensor]:
    """The loss function the function API's ``loss_type=kind`` computes (e.g. ``F.cross_entropy`` for NLL)."""
    return _LOSS_TYPE_FUNCTIONS[kind]


def make_loss_call(fn: Callable[..., Tensor], args: tuple, kwargs: dict, result: Tensor | None) -> LossCall:
    """Normalize the arguments of a call to one of :data:`LOSS_FUNCTIONS`."""
    options = _bind(fn, args, kwargs)
    # Legacy arguments resolve to a reduction exactly as PyTorch does.
    size_average, reduce = options.pop("size_average", None), options.pop("reduce", None)
    if size_average is not None or reduce is not None:
        options["reduction"] = _reduction.legacy_get_string(size_average, reduce)
    return LossCall(
        loss=LOSS_FUNCTIONS[fn],
        input=options.pop("input"),
        target=options.pop("target"),
        options=options,
        result=result,
    )


def averaged_terms(call: LossCall) -> float:
    r""":math:`1/c` of ``call``: 1 for ``"sum"``, the number of averaged terms for ``"mean"``.

    The number of elements of the prediction for MSE and BCE, of the prediction per class
    for cross-entropy with probability targets, and the summed class weights of the
    non-ignored targets for class-index targets (their count without weights). Zero when
    every target is ignored.

    Raises:
        UnsupportedLossOptionError: ``reduction="none"``.
    """
    if call.reduction is Reduction.SUM:
        return 1.0
    return call.loss.averaged_terms(call)


def reduction_factor(call: LossCall) -> float:
    r""":math:`c` in :math:`L = c \sum_n \ell_n` for one recorded loss call: ``1 / averaged_terms(call)``.

    Raises:
        UnsupportedLossOptionError: ``reduction="none"`` (the loss is not a scalar).
        LossInputError: Every target is ignored, so the mean is undefined.
    """
    count = averaged_terms(call)
    if count == 0:
        raise LossInputError(
            f"{call.name}: every target is ignored (ignore_index), so the mean loss and its curvature are undefined."
        )
    return 1.0 / count


def _bind(fn: Callable[..., Tensor], args: tuple, kwargs: dict) -> dict[str, Any]:
    """``inspect.Signature.bind`` with defaults applied, without its cost (a tenth of a millisecond per step).

    The loss functions take positional-or-keyword parameters only; anything else goes to
    ``inspect`` for its error message.
    """
    names, defaults = _NAMES[fn], _DEFAULTS[fn]
    rest = names[len(args) :]
    complete = all(name in defaults or name in kwargs for name in rest)
    if len(args) <= len(names) and complete and all(key in rest for key in kwargs):
        options = dict(defaults)
        options.update(zip(names, args))
        options.update(kwargs)
        return options
    bound = _SIGNATURES[fn].bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)
