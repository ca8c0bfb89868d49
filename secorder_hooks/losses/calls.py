"""Recognition of calls to the standard PyTorch loss functions.

The engine intercepts these functions (and the ``nn`` loss modules, which call them)
while a :func:`~secorder_hooks.extend` context is active, and keeps a :class:`LossCall`
for each, so that the loss-Hessian square root can be formed in closed form.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossKind", "LossCall", "LOSS_FUNCTIONS", "make_loss_call", "averaged_terms"]


class LossKind(enum.Enum):
    """The losses with closed-form Hessian square roots and a known likelihood."""

    CROSS_ENTROPY = "cross_entropy"
    NLL = "nll"
    MSE = "mse"
    BCE_WITH_LOGITS = "bce_with_logits"


LOSS_FUNCTIONS: dict[Callable[..., Tensor], LossKind] = {
    F.cross_entropy: LossKind.CROSS_ENTROPY,
    F.nll_loss: LossKind.NLL,
    F.mse_loss: LossKind.MSE,
    F.binary_cross_entropy_with_logits: LossKind.BCE_WITH_LOGITS,
}

_SIGNATURES = {fn: inspect.signature(fn) for fn in LOSS_FUNCTIONS}
_NAMES = {fn: tuple(sig.parameters) for fn, sig in _SIGNATURES.items()}
_DEFAULTS = {
    fn: {name: p.default for name, p in sig.parameters.items() if p.default is not inspect.Parameter.empty}
    for fn, sig in _SIGNATURES.items()
}


@dataclass(eq=False)
class LossCall:
    """One call of a recognized loss function.

    Attributes:
        kind: Which loss.
        input: The prediction passed to the loss (logits, log-probabilities or outputs).
        target: The target passed to the loss.
        options: Remaining keyword arguments after normalization (``reduction``,
            ``weight``, ``ignore_index``, ``label_smoothing``, ``pos_weight``).
        result: The loss tensor the call returned.
    """

    kind: LossKind
    input: Tensor
    target: Tensor
    options: dict[str, Any]
    result: Tensor


def make_loss_call(fn: Callable[..., Tensor], args: tuple, kwargs: dict, result: Tensor) -> LossCall:
    """Normalize the arguments of a call to one of :data:`LOSS_FUNCTIONS`."""
    options = _bind(fn, args, kwargs)
    # Legacy arguments resolve to a reduction exactly as PyTorch does.
    size_average, reduce = options.pop("size_average", None), options.pop("reduce", None)
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        options["reduction"] = _reduction.legacy_get_string(size_average, reduce)
    return LossCall(
        kind=LOSS_FUNCTIONS[fn],
        input=options.pop("input"),
        target=options.pop("target"),
        options=options,
        result=result,
    )


def averaged_terms(call: LossCall) -> float:
    r"""How many terms the loss of ``call`` averages over with ``reduction="mean"``: :math:`1/c`.

    The number of elements of the prediction for MSE and BCE, of the prediction per class
    for cross-entropy / NLL with probability targets, and the summed class weights of the
    non-ignored targets for class-index targets (their count without weights). Zero when
    every target is ignored.
    """
    x, y = call.input, call.target
    categorical = call.kind in (LossKind.CROSS_ENTROPY, LossKind.NLL)
    if not categorical or y.is_floating_point():
        return float(x.numel() if not categorical else x.numel() // x.shape[1])
    keep = y != call.options.get("ignore_index", -100)
    weight = call.options.get("weight")
    weighted = keep if weight is None else weight[y.clamp(0, weight.numel() - 1)] * keep
    return float(weighted.sum())


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
