r"""First-order quantities: per-example gradients and their statistics.

Each is computed from the gradient of :math:`L` at the recorded layer outputs
(:attr:`~secorder_hooks.quantities.Columns.GRADIENT`, one vector per example), which the
ordinary backward pass captures, by one rule method.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from secorder_hooks.quantities.base import (
    Accumulation,
    BlockSums,
    Columns,
    Needs,
    Order,
    Quantity,
    RuleMethod,
    ShardScaling,
    Sink,
)

__all__ = ["BatchGrad", "SumGradSquared", "BatchL2Grad", "Variance"]


@dataclass(frozen=True)
class BatchGrad(Quantity):
    r"""Per-example gradients :math:`c \nabla_\theta \ell_n`, shape ``[N, *p.shape]``.

    ``p.grad_batch.sum(0)`` equals the gradient of this backward pass.
    """

    attribute: ClassVar[str] = "grad_batch"
    order: ClassVar[Order] = Order.FIRST
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)

    @property
    def needs(self) -> Needs:
        """The gradient, by per-example gradients."""
        return Needs(Columns.GRADIENT, per_example=True, rule_methods=frozenset({RuleMethod.PER_EXAMPLE_GRADS}))

    def sink(self) -> Sink:
        """``[N, *p]``: the per-example gradients of the one vector."""
        return BlockSums(lambda results, parts: results.per_example_grads(parts)[0])


@dataclass(frozen=True)
class SumGradSquared(Quantity):
    r""":math:`\sum_n (c \nabla_\theta \ell_n)^2`, shape ``p.shape``."""

    attribute: ClassVar[str] = "sum_grad_squared"
    order: ClassVar[Order] = Order.FIRST
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(2)

    @property
    def needs(self) -> Needs:
        """The gradient, by the squared sum."""
        return Needs(Columns.GRADIENT, rule_methods=frozenset({RuleMethod.WEIGHTED_SQUARED_SUM}))

    def sink(self) -> Sink:
        r""":math:`\sum_n g_n^2`."""
        return BlockSums(lambda results, parts: results.weighted_squared_sum(parts, per_example=False))


@dataclass(frozen=True)
class BatchL2Grad(Quantity):
    r"""Squared norms :math:`\| c \nabla_\theta \ell_n \|^2` per parameter tensor, shape ``[N]``."""

    attribute: ClassVar[str] = "batch_l2"
    order: ClassVar[Order] = Order.FIRST
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(2)

    @property
    def needs(self) -> Needs:
        """The gradient, by the squared norms."""
        return Needs(Columns.GRADIENT, per_example=True, rule_methods=frozenset({RuleMethod.SQUARED_NORMS}))

    def sink(self) -> Sink:
        r"""``[N]``: :math:`\|g_n\|^2`."""
        return BlockSums(lambda results, parts: results.squared_norms(parts)[0])


@dataclass(frozen=True)
class Variance(Quantity):
    r"""Variance over examples of ``grad_batch`` (``unbiased=False``), shape ``p.shape``.

    The value of one pass is :math:`\sum_n g_n^2`; the accumulation
    (:attr:`~secorder_hooks.Accumulation.VARIANCE`) computes the variance from it, the
    number of examples and ``.grad``.
    """

    attribute: ClassVar[str] = "variance"
    order: ClassVar[Order] = Order.FIRST
    accumulation: ClassVar[Accumulation] = Accumulation.VARIANCE
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(2)

    @property
    def needs(self) -> Needs:
        """The gradient, by the squared sum."""
        return Needs(Columns.GRADIENT, rule_methods=frozenset({RuleMethod.WEIGHTED_SQUARED_SUM}))

    def sink(self) -> Sink:
        r""":math:`\sum_n g_n^2` of this pass."""
        return BlockSums(lambda results, parts: results.weighted_squared_sum(parts, per_example=False))
