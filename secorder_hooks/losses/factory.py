"""Building a :class:`~secorder_hooks.losses.base.LossTerm` from a recorded call or a loss kind."""

from __future__ import annotations

import torch
from torch import Tensor

from secorder_hooks.errors import LossInputError
from secorder_hooks.losses.base import LossCall, LossTerm
from secorder_hooks.losses.calls import loss_type_function, make_loss_call
from secorder_hooks.losses.cross_entropy import check_class_range
from secorder_hooks.losses.kinds import LossKind, Reduction

__all__ = ["loss_term_from_call", "loss_call_from_type", "loss_term_from_type"]


def loss_term_from_call(call: LossCall) -> LossTerm:
    """The closed-form term of a recorded loss call whose result is the loss being differentiated.

    Raises:
        UnsupportedLossError: ``reduction="none"``, NLL not over ``log_softmax``, broadcasting MSE, ...
        LossInputError: Invalid target or option shapes.
    """
    return call.loss.from_call(call)


def loss_call_from_type(
    loss_type: str | LossKind, outputs: Tensor, targets: Tensor, reduction: str | Reduction = "mean"
) -> LossCall:
    """The call of the loss function behind ``loss_type`` on ``outputs`` and ``targets``, checked, not run.

    Integer class indices of any integer dtype are converted to ``torch.long``.

    Raises:
        UnsupportedLossOptionError: Unknown ``loss_type`` or ``reduction``.
        LossInputError: Mismatched batch sizes, shapes or target dtype.
    """
    kind = LossKind.parse(loss_type, "loss_type")
    red = Reduction.parse(reduction, f"loss_type {kind.value!r}: reduction")
    if outputs.dim() == 0 or targets.dim() == 0:
        raise LossInputError(
            f"loss_type {kind.value!r}: outputs {tuple(outputs.shape)} and targets {tuple(targets.shape)} "
            f"need a batch axis (dim 0)."
        )
    if outputs.shape[0] != targets.shape[0]:
        raise LossInputError(
            f"loss_type {kind.value!r}: outputs have batch size {outputs.shape[0]} but targets "
            f"{targets.shape[0]} (dim 0 is the example axis)."
        )
    integer = not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    if kind is LossKind.NLL and integer:
        targets = targets.long()
    call = make_loss_call(loss_type_function(kind), (outputs, targets), {"reduction": red.value}, None)
    call.loss.check_targets(call)
    if kind is LossKind.NLL:
        check_class_range(call)  # for model functions, PyTorch's own error says it (and costs no sync)
    return call


def loss_term_from_type(
    loss_type: str | LossKind, outputs: Tensor, targets: Tensor, reduction: str | Reduction = "mean"
) -> tuple[Tensor, LossTerm]:
    """Loss and its term for the function API.

    Args:
        loss_type: See :class:`~secorder_hooks.losses.kinds.LossKind`.
        outputs: Model outputs ``[N, *f]`` (logits for ``nll`` with classes on axis 1 and for ``bce``).
        targets: ``nll``: integer class indices ``[N, *d]`` or class probabilities shaped like
            ``outputs``; ``mse`` / ``bce``: floating, shaped like ``outputs``.
        reduction: ``"mean"`` or ``"sum"``.

    Returns:
        The scalar loss (computed with the standard functional, graph attached to ``outputs``) and
        its :class:`~secorder_hooks.losses.base.LossTerm` (edge: ``outputs``).

    Raises:
        UnsupportedLossOptionError: Unknown ``loss_type`` or ``reduction``.
        LossInputError: Mismatched batch sizes, shapes or target dtype.
    """
    call = loss_call_from_type(loss_type, outputs, targets, reduction)
    term = call.loss.from_call(call)
    call.result = call.loss.function(call.input, call.target, reduction=call.options["reduction"])  # type: ignore[misc]
    return call.result, term
