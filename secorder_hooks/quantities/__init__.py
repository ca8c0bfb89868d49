r"""The quantities :func:`secorder_hooks.extend` computes during ``loss.backward()``.

Notation (see :doc:`/conventions`): the loss is :math:`L = c \sum_n \ell_n(f_n)` with
:math:`N` examples along dim 0, model output :math:`f_n` and reduction factor :math:`c`
(1 for ``reduction="sum"``, one over the number of averaged terms for ``"mean"``).
Each quantity is written to every trainable parameter ``p`` under the attribute name of
BackPACK, so code written for BackPACK reads it unchanged.

Like ``.grad``, the quantities accumulate over the backward passes run since ``.grad``
was last reset (see :doc:`/conventions`); :class:`~secorder_hooks.Accumulation` says how each one does.
Each quantity also declares how its value on a batch follows from its values on shards
of the batch (:class:`~secorder_hooks.quantities.ShardScaling`), which data-parallel training needs
(:doc:`/distributed`).

Each quantity owns its computation (:mod:`secorder_hooks.quantities.base`): it declares
what it needs from the engine (:class:`~secorder_hooks.quantities.Needs`) and makes the
:class:`~secorder_hooks.quantities.Sink` that turns the
rule results into its per-parameter values. One module per family:
:mod:`~secorder_hooks.quantities.first_order`, :mod:`~secorder_hooks.quantities.diagonals`,
:mod:`~secorder_hooks.quantities.kronecker`.
"""

from secorder_hooks.quantities.base import (
    Accumulation,
    BlockSums,
    Columns,
    Needs,
    Order,
    PassContext,
    Quantity,
    RuleMethod,
    RuleResults,
    ShardScaling,
    Sink,
)
from secorder_hooks.quantities.diagonals import (
    BatchDiagGGNExact,
    BatchDiagHessian,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
)
from secorder_hooks.quantities.first_order import BatchGrad, BatchL2Grad, SumGradSquared, Variance
from secorder_hooks.quantities.kronecker import (
    EKFAC,
    KFAC,
    KFLR,
    KFACEmpirical,
    KroneckerFactors,
    KroneckerQuantity,
    KronFallback,
    WeightSharing,
)

__all__ = [
    "Quantity",
    "Order",
    "Accumulation",
    "ShardScaling",
    "BatchGrad",
    "SumGradSquared",
    "BatchL2Grad",
    "Variance",
    "DiagGGNExact",
    "BatchDiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
    "WeightSharing",
    "KronFallback",
    "KroneckerQuantity",
    "KroneckerFactors",
    "KFLR",
    "KFAC",
    "KFACEmpirical",
    "EKFAC",
    "Columns",
    "RuleMethod",
    "Needs",
    "Sink",
    "RuleResults",
    "PassContext",
    "BlockSums",
]
