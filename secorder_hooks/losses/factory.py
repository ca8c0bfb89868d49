"""Building a :class:`~secorder_hooks.losses.base.LossTerm` from a recorded call or a loss-type name."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor

from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses.base import LossInputError, LossTerm, Reduction
from secorder_hooks.losses.binary import BCEWithLogitsLossTerm
from secorder_hooks.losses.calls import LossCall, LossKind
from secorder_hooks.losses.cross_entropy import CrossEntropyLossTerm, NLLLossTerm
from secorder_hooks.losses.regression import MSELossTerm

__all__ = ["LossType", "loss_term_from_call", "loss_term_from_type"]


class LossType(enum.Enum):
    """Likelihoods accepted by the function API's ``loss_type`` argument.

    * ``NLL`` (``"nll"``, alias ``"cross_entropy"``): categorical, ``F.cross_entropy`` on logits.
    * ``MSE`` (``"mse"``, alias ``"gaussian"``): ``F.mse_loss`` (Gaussian with variance 1/2).
    * ``BCE`` (``"bce"``, alias ``"bernoulli"``): ``F.binary_cross_entropy_with_logits``.
    """

    NLL = "nll"
    MSE = "mse"
    BCE = "bce"

    @classmethod
    def parse(cls, value: str | LossType) -> LossType:
        """The loss type named ``value`` (case-insensitive, aliases accepted).

        Raises:
            UnsupportedLossError: Unknown name (lists the accepted ones).
        """
        if isinstance(value, LossType):
            return value
        key = str(value).strip().lower()
        if key in _ALIASES:
            return _ALIASES[key]
        accepted = ", ".join(repr(name) for name in _ALIASES)
        raise UnsupportedLossError(f"Unknown loss_type {value!r}; accepted: {accepted}.")


_ALIASES: dict[str, LossType] = {
    "nll": LossType.NLL,
    "cross_entropy": LossType.NLL,
    "mse": LossType.MSE,
    "gaussian": LossType.MSE,
    "bce": LossType.BCE,
    "bernoulli": LossType.BCE,
}


def loss_term_from_call(call: LossCall) -> LossTerm:
    """The closed-form term of a recorded loss call whose result is the loss being differentiated.

    Raises:
        UnsupportedLossError: ``reduction="none"``, NLL not over ``log_softmax``, broadcasting MSE, ...
        LossInputError: Invalid target or option shapes.
    """
    opts = call.options
    reduction = opts.get("reduction", "mean")
    if call.kind is LossKind.CROSS_ENTROPY:
        return CrossEntropyLossTerm(
            call.input,
            call.target,
            weight=opts.get("weight"),
            ignore_index=opts.get("ignore_index", -100),
            reduction=reduction,
            label_smoothing=opts.get("label_smoothing", 0.0),
        )
    if call.kind is LossKind.NLL:
        return NLLLossTerm(
            call.input,
            call.target,
            weight=opts.get("weight"),
            ignore_index=opts.get("ignore_index", -100),
            reduction=reduction,
        )
    if call.kind is LossKind.MSE:
        return MSELossTerm(call.input, call.target, reduction=reduction, weight=opts.get("weight"))
    if call.kind is LossKind.BCE_WITH_LOGITS:
        return BCEWithLogitsLossTerm(
            call.input, call.target, weight=opts.get("weight"), pos_weight=opts.get("pos_weight"), reduction=reduction
        )
    raise UnsupportedLossError(f"No closed-form loss term for {call.kind}.")  # pragma: no cover


def _check_batch(outputs: Tensor, targets: Tensor, loss_type: LossType) -> None:
    if outputs.dim() == 0 or targets.dim() == 0:
        raise LossInputError(
            f"loss_type {loss_type.value!r}: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} "
            f"need a batch axis (dim 0)."
        )
    if outputs.shape[0] != targets.shape[0]:
        raise LossInputError(
            f"loss_type {loss_type.value!r}: outputs have batch size {outputs.shape[0]} but targets "
            f"{targets.shape[0]} (dim 0 is the example axis)."
        )


def _check_same_float(outputs: Tensor, targets: Tensor, loss_type: LossType) -> None:
    if not targets.is_floating_point():
        raise LossInputError(
            f"loss_type {loss_type.value!r}: targets must be floating point, got {targets.dtype} "
            f"(convert with targets.to(outputs.dtype))."
        )
    if targets.shape != outputs.shape:
        raise LossInputError(
            f"loss_type {loss_type.value!r}: targets shape {tuple(targets.shape)} must equal outputs shape "
            f"{tuple(outputs.shape)}."
        )


def loss_term_from_type(
    loss_type: str | LossType, outputs: Tensor, targets: Tensor, reduction: str | Reduction = "mean"
) -> tuple[Tensor, LossTerm]:
    """Loss and its term for the function API.

    Args:
        loss_type: See :class:`LossType`.
        outputs: Model outputs ``[N, *f]`` (logits for ``nll`` with classes on axis 1 and for ``bce``).
        targets: ``nll``: integer class indices ``[N, *d]`` or class probabilities shaped like
            ``outputs``; ``mse`` / ``bce``: floating, shaped like ``outputs``.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        The scalar loss (computed with the standard functional, graph attached to ``outputs``) and
        its :class:`LossTerm` (edge: ``outputs``).

    Raises:
        UnsupportedLossError: Unknown ``loss_type`` or ``reduction``.
        LossInputError: Mismatched batch sizes, shapes or target dtype.
    """
    kind = LossType.parse(loss_type)
    red = Reduction.parse(reduction, f"loss_type {kind.value!r}")
    _check_batch(outputs, targets, kind)
    if kind is LossType.NLL:
        if outputs.dim() < 2:
            raise LossInputError(f"loss_type 'nll': outputs must be logits [N, C, *d], got {tuple(outputs.shape)}.")
        if not targets.is_floating_point():
            if targets.dtype.is_complex or targets.dtype == torch.bool:
                raise LossInputError(f"loss_type 'nll': targets must be integer class indices, got {targets.dtype}.")
            targets = targets.long()
            n_classes = outputs.shape[1]
            if targets.numel() and (targets.min() < 0 or targets.max() >= n_classes):
                raise LossInputError(
                    f"loss_type 'nll': class indices must lie in [0, {n_classes}) for outputs with "
                    f"{n_classes} classes on axis 1; got range [{int(targets.min())}, {int(targets.max())}]."
                )
        term = CrossEntropyLossTerm(outputs, targets, reduction=red)  # validates target shape
        return F.cross_entropy(outputs, targets, reduction=red.value), term
    _check_same_float(outputs, targets, kind)
    if kind is LossType.MSE:
        term = MSELossTerm(outputs, targets, reduction=red)
        return F.mse_loss(outputs, targets, reduction=red.value), term
    term = BCEWithLogitsLossTerm(outputs, targets, reduction=red)
    return F.binary_cross_entropy_with_logits(outputs, targets, reduction=red.value), term
