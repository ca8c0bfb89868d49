"""Losses: recognition of standard loss calls and their Hessian square roots."""

from secorder_hooks.losses.autograd import AutogradLossTerm
from secorder_hooks.losses.base import (
    LossInputError,
    LossTerm,
    Reduction,
    SqrtColumns,
    diagonal_sqrt_columns,
    edge_of,
    one_hot_columns,
)
from secorder_hooks.losses.binary import BCEWithLogitsLossTerm
from secorder_hooks.losses.calls import LOSS_FUNCTIONS, LossCall, LossKind, make_loss_call
from secorder_hooks.losses.cross_entropy import CrossEntropyLossTerm, NLLLossTerm, SoftmaxLossTerm
from secorder_hooks.losses.factory import LossType, loss_term_from_call, loss_term_from_type
from secorder_hooks.losses.regression import MSELossTerm

__all__ = [
    "LOSS_FUNCTIONS",
    "AutogradLossTerm",
    "BCEWithLogitsLossTerm",
    "CrossEntropyLossTerm",
    "LossCall",
    "LossInputError",
    "LossKind",
    "LossTerm",
    "LossType",
    "MSELossTerm",
    "NLLLossTerm",
    "Reduction",
    "SoftmaxLossTerm",
    "SqrtColumns",
    "diagonal_sqrt_columns",
    "edge_of",
    "loss_term_from_call",
    "loss_term_from_type",
    "make_loss_call",
    "one_hot_columns",
]
