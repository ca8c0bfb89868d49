r"""The quantities :func:`secorder_hooks.extend` computes during ``loss.backward()``.

Notation (see :doc:`/conventions`): the loss is :math:`L = c \sum_n \ell_n(f_n)` with
:math:`N` examples along dim 0, model output :math:`f_n` and reduction factor :math:`c`
(1 for ``reduction="sum"``, one over the number of averaged terms for ``"mean"``).
Each quantity is written to every trainable parameter ``p`` under the attribute name of
BackPACK, so code written for BackPACK reads it unchanged.

Like ``.grad``, the quantities accumulate over the backward passes run since ``.grad``
was last reset (see :doc:`/conventions`); :class:`Accumulation` says how each one does.
Each quantity also declares how its value on a batch follows from its values on shards
of the batch (:class:`ShardScaling`), which data-parallel training needs
(:doc:`/distributed`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import ClassVar

import torch

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
]


class Order(enum.Enum):
    """Which backward passes a quantity needs."""

    FIRST = "first"
    """Computed from the output gradients of the ordinary backward pass."""
    SECOND = "second"
    """Needs columns of a curvature square root backpropagated through the model."""


class Accumulation(enum.Enum):
    r"""How a quantity of several backward passes (micro-batches) combines, as ``.grad`` does.

    With passes :math:`b = 1, \dots, k` of :math:`N_b` examples since ``.grad`` was last
    reset, the result equals the quantity of one batch of the concatenated examples, each
    example's term carrying the reduction factor :math:`c_b` of its own pass.
    """

    SUM = "sum"
    """A sum over examples; the passes' values add up (``sum_grad_squared``, the diagonals)."""
    CONCATENATE = "concatenate"
    """One row per example; the passes' values are concatenated along dim 0 (``grad_batch``)."""
    VARIANCE = "variance"
    """The variance over all examples of the passes, from their running sums (``variance``)."""


@dataclass(frozen=True)
class ShardScaling:
    r"""How the value of a quantity in one backward pass depends on the batch.

    The value is :math:`T = c^k N^{-m} \sum_n q_n` (a sum over examples:
    :attr:`~secorder_hooks.Accumulation.SUM`, and the sum of squares that :attr:`~secorder_hooks.Accumulation.VARIANCE`
    keeps) or has the rows :math:`T_n = c^k N^{-m} q_n` (:attr:`~secorder_hooks.Accumulation.CONCATENATE`),
    where :math:`q_n` depends on example :math:`n` alone, :math:`c` is the reduction factor
    of the loss and :math:`N` the number of examples. Split the batch into shards
    :math:`r` with factors :math:`c_r` and sizes :math:`N_r`: the batch's value is
    :math:`T = \sum_r w_r T^{(r)}` (rows: :math:`T_n = w_r T^{(r)}_n` for :math:`n` in
    shard :math:`r`) with

    .. math::
        w_r = (c / c_r)^k \, (N_r / N)^m,

    where :math:`c / c_r = D_r / D` for ``reduction="mean"`` (:math:`D` the number of
    averaged terms) and :math:`1` for ``"sum"``.

    Attributes:
        c_power: :math:`k`, the power of the reduction factor.
        example_power: :math:`m`, the power of :math:`1/N` (1 for a mean over examples).
    """

    c_power: int
    example_power: int = 0


class Quantity:
    """Base class of the quantities; subclasses are small frozen dataclasses.

    Attributes:
        attribute: Name of the attribute written to each trainable parameter.
        order: Which backward passes the quantity needs.
        accumulation: How the values of successive backward passes combine.
        shard_scaling: How the value of one pass combines over shards of its batch;
            ``None`` for a quantity that does not declare it, which then cannot be
            synchronized across processes (the engine raises instead of guessing).
    """

    attribute: ClassVar[str]
    order: ClassVar[Order]
    accumulation: ClassVar[Accumulation] = Accumulation.SUM
    shard_scaling: ClassVar[ShardScaling | None] = None

    def summed_shape(self, p: torch.Tensor) -> torch.Size:
        """Shape of the value of one pass for parameter ``p`` when it is a sum (``p.shape``).

        Used for a parameter that one process's shard does not reach while another's
        does, so that every process contributes the same buffer layout.
        """
        return p.shape


@dataclass(frozen=True)
class BatchGrad(Quantity):
    r"""Per-example gradients :math:`c \nabla_\theta \ell_n`, shape ``[N, *p.shape]``.

    ``p.grad_batch.sum(0)`` equals the gradient of this backward pass.
    """

    attribute: ClassVar[str] = "grad_batch"
    order: ClassVar[Order] = Order.FIRST
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)


@dataclass(frozen=True)
class SumGradSquared(Quantity):
    r""":math:`\sum_n (c \nabla_\theta \ell_n)^2`, shape ``p.shape``."""

    attribute: ClassVar[str] = "sum_grad_squared"
    order: ClassVar[Order] = Order.FIRST
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(2)


@dataclass(frozen=True)
class BatchL2Grad(Quantity):
    r"""Squared norms :math:`\| c \nabla_\theta \ell_n \|^2` per parameter tensor, shape ``[N]``."""

    attribute: ClassVar[str] = "batch_l2"
    order: ClassVar[Order] = Order.FIRST
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(2)


@dataclass(frozen=True)
class Variance(Quantity):
    r"""Variance over examples of ``grad_batch`` (``unbiased=False``), shape ``p.shape``."""

    attribute: ClassVar[str] = "variance"
    order: ClassVar[Order] = Order.FIRST
    accumulation: ClassVar[Accumulation] = Accumulation.VARIANCE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(2)


@dataclass(frozen=True)
class DiagGGNExact(Quantity):
    r"""Diagonal of :math:`G = c \sum_n J_n^\top (\partial^2 \ell_n / \partial f_n^2) J_n`."""

    attribute: ClassVar[str] = "diag_ggn_exact"
    order: ClassVar[Order] = Order.SECOND
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)


@dataclass(frozen=True)
class BatchDiagGGNExact(Quantity):
    """Example ``n``'s term of :class:`DiagGGNExact`, shape ``[N, *p.shape]``."""

    attribute: ClassVar[str] = "diag_ggn_exact_batch"
    order: ClassVar[Order] = Order.SECOND
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)


@dataclass(frozen=True)
class DiagGGNMC(Quantity):
    r"""Unbiased Monte-Carlo estimate of the diagonal of the GGN / exact Fisher.

    For each of ``mc_samples`` draws :math:`\hat y_n \sim p(y \mid f_n)` from the model's
    predictive distribution, the gradient of the sampled loss is backpropagated and its
    square accumulated with weight ``1 / mc_samples``, so the expectation equals
    :class:`DiagGGNExact` exactly.

    Args:
        mc_samples: Number of samples per example, at least 1.
        generator: Optional :class:`torch.Generator` that makes the samples reproducible.
    """

    mc_samples: int = 1
    generator: torch.Generator | None = field(default=None, compare=False)

    attribute: ClassVar[str] = "diag_ggn_mc"
    order: ClassVar[Order] = Order.SECOND
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)

    def __post_init__(self) -> None:
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"DiagGGNMC(mc_samples=...) must be a positive int, got {self.mc_samples!r}.")


@dataclass(frozen=True)
class DiagHessian(Quantity):
    """Diagonal of the exact Hessian of the loss as computed (what ``torch.func.hessian`` gives)."""

    attribute: ClassVar[str] = "diag_h"
    order: ClassVar[Order] = Order.SECOND
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)


@dataclass(frozen=True)
class BatchDiagHessian(Quantity):
    """Example ``n``'s term of :class:`DiagHessian`, shape ``[N, *p.shape]``."""

    attribute: ClassVar[str] = "diag_h_batch"
    order: ClassVar[Order] = Order.SECOND
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)
