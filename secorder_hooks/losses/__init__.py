"""The loss layer: the standard losses, their recognition in a call, reduction factor and Hessian square roots.

Used by the engine (which sees loss calls inside :func:`~secorder_hooks.extend`) and by the
function API alike. See :doc:`/losses` for how to add a loss.
"""

from secorder_hooks.errors import LossInputError
from secorder_hooks.losses.autograd import AutogradLossTerm
from secorder_hooks.losses.base import (
    LossCall,
    LossTerm,
    SqrtColumns,
    diagonal_sqrt_columns,
    edge_of,
    one_hot_columns,
)
from secorder_hooks.losses.binary import BCEWithLogitsLossTerm
from secorder_hooks.losses.calls import (
    LOSS_FUNCTIONS,
    averaged_terms,
    make_loss_call,
    reduction_factor,
    standard_loss,
)
from secorder_hooks.losses.cross_entropy import CrossEntropyLossTerm, NLLLossTerm, SoftmaxLossTerm
from secorder_hooks.losses.factory import loss_call_from_type, loss_term_from_call, loss_term_from_type
from secorder_hooks.losses.kinds import LossKind, Reduction
from secorder_hooks.losses.recognition import record_loss_calls, single_loss_call, the_loss_call
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
    "MSELossTerm",
    "NLLLossTerm",
    "Reduction",
    "SoftmaxLossTerm",
    "SqrtColumns",
    "averaged_terms",
    "diagonal_sqrt_columns",
    "edge_of",
    "loss_call_from_type",
    "loss_term_from_call",
    "loss_term_from_type",
    "make_loss_call",
    "one_hot_columns",
    "record_loss_calls",
    "reduction_factor",
    "single_loss_call",
    "standard_loss",
    "the_loss_call",
]
