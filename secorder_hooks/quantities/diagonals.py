r"""Curvature diagonals: the GGN / exact Fisher, its Monte-Carlo estimate and the exact Hessian.

With vectors :math:`s_{vn}` at the model output and weights :math:`w_{vn}` whose weighted
outer products sum to the loss Hessian of example :math:`n` (exact or sampled
:class:`~secorder_hooks.quantities.Columns`), the diagonal is

.. math:: \operatorname{diag} G = \sum_n \sum_v w_{vn} \big(J_n^\top s_{vn}\big)^{\odot 2},

which the rules give as their weighted squared sum (:class:`Diagonals`). The exact
Hessian diagonal adds the second-order terms of the curved operations, which the engine
computes (:attr:`~secorder_hooks.quantities.Columns.HESSIAN`, :class:`HessianDiagonals`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from secorder_hooks.quantities.base import (
    Accumulation,
    Columns,
    Needs,
    Order,
    Params,
    PassContext,
    Quantity,
    RuleMethod,
    RuleResults,
    ShardScaling,
    Sink,
)

__all__ = [
    "Diagonals",
    "HessianDiagonals",
    "DiagGGNExact",
    "BatchDiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
]

_SQUARED_SUM = frozenset({RuleMethod.WEIGHTED_SQUARED_SUM})
_PER_EXAMPLE_CURVATURE = "per-example curvature is"


class Diagonals:
    r"""A sink of running sums of diagonal contributions per parameter id: :math:`\sum_{v,n} w_{vn} (g^{(v)}_n)^2`.

    Args:
        per_example: Keep the example axis (``[N, *p]``) instead of ``p.shape``.
    """

    def __init__(self, per_example: bool) -> None:
        self.per_example = per_example
        self.values: dict[int, Tensor] = {}

    def add(self, key: int, value: Tensor) -> None:
        """Add ``value`` to the running sum of parameter ``key``."""
        self.values[key] = value if key not in self.values else self.values[key] + value

    def accumulate(self, results: RuleResults, params: Params) -> None:
        r"""Add :math:`\sum_v w_{vn} (g^{(v)}_n)^2` of one block of vectors for each of ``params``."""
        for key, parts in params:
            self.add(key, results.weighted_squared_sum(parts, self.per_example))

    def get(self, key: int, like: Tensor, batch_size: int) -> Tensor:
        """The sum for ``key``, zeros shaped like ``like`` (per example if kept) if none."""
        if key in self.values:
            return self.values[key]
        shape = (batch_size, *like.shape) if self.per_example else like.shape
        return torch.zeros(shape, dtype=like.dtype, device=like.device)

    def finish(self, context: PassContext) -> Mapping[int, Tensor]:
        """The sum of every contributing parameter (zeros where no column reached it)."""
        return {key: self.get(key, context.params[key], context.batch_size) for key in context.contributions.by_param}


class HessianDiagonals(Diagonals):
    """A sink of the exact Hessian diagonal: the GGN part from the columns plus the engine's second-order terms."""

    def __init__(self, per_example: bool) -> None:
        super().__init__(per_example)
        self.terms: dict[int, Tensor] = {}

    def add_terms(self, terms: Mapping[int, Tensor], per_example: bool) -> None:
        """Add the second-order terms (``[N, *p]`` if ``per_example``, summed here unless this sink keeps examples)."""
        for key, value in terms.items():
            value = value.sum(0) if per_example and not self.per_example else value
            self.terms[key] = value if key not in self.terms else self.terms[key] + value

    def finish(self, context: PassContext) -> Mapping[int, Tensor]:
        """GGN part plus the terms (the GGN part alone for a parameter no curved operation reaches)."""
        ggn = super().finish(context)
        return {key: g + self.terms[key] if key in self.terms else g for key, g in ggn.items()}


@dataclass(frozen=True)
class _CurvatureDiagonal(Quantity):
    """A diagonal of the columns' weighted squared sum, summed or per example: the declarations below.

    Subclasses set :attr:`columns`, :attr:`per_example` and :attr:`sink_type`; the per-example
    ones keep the example axis (``[N, *p.shape]``) and are undefined when the loss couples
    the examples.
    """

    order: ClassVar[Order] = Order.SECOND
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)
    columns: ClassVar[Columns]
    per_example: ClassVar[bool] = False
    sink_type: ClassVar[type[Diagonals]] = Diagonals

    @property
    def needs(self) -> Needs:
        """:attr:`columns`, by the weighted squared sum (per example if :attr:`per_example`)."""
        return Needs(
            self.columns,
            per_example=self.per_example,
            rule_methods=_SQUARED_SUM,
            undefined_when_coupled=_PER_EXAMPLE_CURVATURE if self.per_example else None,
        )

    def sink(self) -> Sink:
        """A :attr:`sink_type` sink, per example if :attr:`per_example`."""
        return self.sink_type(per_example=self.per_example)


@dataclass(frozen=True)
class DiagGGNExact(_CurvatureDiagonal):
    r"""Diagonal of :math:`G = c \sum_n J_n^\top (\partial^2 \ell_n / \partial f_n^2) J_n`."""

    attribute: ClassVar[str] = "diag_ggn_exact"
    columns: ClassVar[Columns] = Columns.EXACT


@dataclass(frozen=True)
class BatchDiagGGNExact(_CurvatureDiagonal):
    """Example ``n``'s term of :class:`DiagGGNExact`, shape ``[N, *p.shape]``."""

    attribute: ClassVar[str] = "diag_ggn_exact_batch"
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    columns: ClassVar[Columns] = Columns.EXACT
    per_example: ClassVar[bool] = True


@dataclass(frozen=True)
class DiagGGNMC(_CurvatureDiagonal):
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
    columns: ClassVar[Columns] = Columns.SAMPLED

    def __post_init__(self) -> None:
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"DiagGGNMC(mc_samples=...) must be a positive int, got {self.mc_samples!r}.")

    @property
    def needs(self) -> Needs:
        """``mc_samples`` sampled columns per example."""
        return Needs(self.columns, rule_methods=_SQUARED_SUM, samples=self.mc_samples, generator=self.generator)


@dataclass(frozen=True)
class DiagHessian(_CurvatureDiagonal):
    """Diagonal of the exact Hessian of the loss as computed (what ``torch.func.hessian`` gives)."""

    attribute: ClassVar[str] = "diag_h"
    columns: ClassVar[Columns] = Columns.HESSIAN
    sink_type: ClassVar[type[Diagonals]] = HessianDiagonals


@dataclass(frozen=True)
class BatchDiagHessian(_CurvatureDiagonal):
    """Example ``n``'s term of :class:`DiagHessian`, shape ``[N, *p.shape]``."""

    attribute: ClassVar[str] = "diag_h_batch"
    accumulation: ClassVar[Accumulation] = Accumulation.CONCATENATE
    columns: ClassVar[Columns] = Columns.HESSIAN
    per_example: ClassVar[bool] = True
    sink_type: ClassVar[type[Diagonals]] = HessianDiagonals
