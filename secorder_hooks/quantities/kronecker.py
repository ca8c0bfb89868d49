r"""Kronecker-factored curvature blocks: KFLR, KFAC, KFACEmpirical and EKFAC.

The quantities of this family share one sink (:class:`~secorder_hooks.quantities.kron_factors.KronSums`)
and differ in the vectors they ask for (:class:`~secorder_hooks.quantities.Columns`):
exact loss-Hessian square-root columns (KFLR, EKFAC), sampled ones (KFAC), the gradient
(KFACEmpirical).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from secorder_hooks.errors import ExtensionError
from secorder_hooks.quantities.base import (
    Accumulation,
    Columns,
    Needs,
    Order,
    Quantity,
    RuleMethod,
    ShardScaling,
    Sink,
)
from secorder_hooks.quantities.kron_factors import EkfacSums, KroneckerFactors, KronFallback, KronSums, WeightSharing

__all__ = [
    "WeightSharing",
    "KronFallback",
    "KroneckerQuantity",
    "KroneckerFactors",
    "KFLR",
    "KFAC",
    "KFACEmpirical",
    "EKFAC",
]


@dataclass(frozen=True)
class KroneckerQuantity(Quantity):
    r"""Kronecker factors of the diagonal blocks of a curvature matrix, per parameter.

    For a Linear or convolution layer with weight :math:`W` (``[O, I]``, a convolution's
    flattened to ``[C_out, C_in / G * prod(kernel)]``) the block of ``vec(W)`` (row-major,
    PyTorch's ``W.flatten()``) is approximated by :math:`B \otimes A`:

    * :math:`A` is the second moment of the layer input :math:`a` (a convolution's
      unfolded input patches), a *mean* over the :math:`N` examples (and positions, see
      :class:`WeightSharing`);
    * :math:`B` is the second moment of the columns :math:`g_v` backpropagated to the
      layer output, a *sum* over columns, examples (and positions) weighted by
      :math:`w_{vn}`, so it carries the reduction factor :math:`c` of the loss.

    For one example (``N = 1``) without positions, :math:`B \otimes A` *is* the block:
    :math:`\sum_v w_v (g_v \otimes a)(g_v \otimes a)^\top`. The attribute ``p.<name>`` is a
    list of factors whose Kronecker product, in list order, approximates the block of
    ``p.flatten()``, as BackPACK writes it: ``[B, A]`` for a weight, ``[B]`` for a bias.
    The bias is the weight of a constant input 1, folded in as an extra last coordinate of
    :math:`a`: with ``separate_weight_and_bias=False`` the weight gets ``[B, A']``,
    :math:`A'` over ``(a, 1)`` (``I + 1`` square), approximating the joint block of the
    rows ``[W | b]``, and the bias gets no attribute; separated (the default), the bias's
    factor is :math:`B A'_{I+1, I+1} = B`.

    A convolution with ``groups = G > 1`` gets ``[B, A]`` with ``B`` ``[G, O/G, O/G]`` and
    ``A`` ``[G, I, I]``: its block is block diagonal over groups, group ``g``'s being
    :math:`B_g \otimes A_g` (the bias gets the full ``[O, O]`` block diagonal of the
    :math:`B_g`). A module called several times in one forward pass (or a parameter
    shared by several modules) gets the sums over its calls of both :math:`A` and
    :math:`B`, as curvlinops accumulates them. A factor of dim 1 is a diagonal (see
    :class:`KronFallback`).

    Scaling: :math:`B \otimes A` approximates the same matrix as the diagonal quantity
    named in each subclass, including its factor :math:`c`; BackPACK's convolution
    factors differ (see :doc:`/kronecker`).

    Across processes (:doc:`/distributed`), ``shard_scaling`` is that of :math:`B` and of a
    fallback diagonal (sums over examples); :math:`A`, a mean over examples, combines with
    ``ShardScaling(0, 1)``.

    Attributes:
        sharing: Treatment of weight-sharing positions.
        separate_weight_and_bias: Separate factors for weight and bias (default), or one
            joint pair with the bias folded into :math:`A`.
        fallback: What parameters of layers without a Kronecker rule get.
    """

    sharing: WeightSharing = WeightSharing.EXPAND
    separate_weight_and_bias: bool = True
    fallback: KronFallback = KronFallback.ERROR

    accumulation: ClassVar[Accumulation] = Accumulation.KRONECKER

    def __post_init__(self) -> None:
        for name, kind in (("sharing", WeightSharing), ("fallback", KronFallback)):
            object.__setattr__(self, name, kind.parse(getattr(self, name), f"{type(self).__name__}: {name}"))

    def _needs(self, columns: Columns, samples: int = 0, generator: torch.Generator | None = None) -> Needs:
        """Needs of the family: the rule's Kronecker methods unless the fallback covers modules without them."""
        methods = frozenset({RuleMethod.KRONECKER}) if self.fallback is KronFallback.ERROR else frozenset()
        undefined = "the Kronecker factors, built per example, are"
        return Needs(
            columns, rule_methods=methods, undefined_when_coupled=undefined, samples=samples, generator=generator
        )

    def sink(self) -> Sink:
        """:class:`~secorder_hooks.quantities.kron_factors.KronSums` of the quantity's columns."""
        return KronSums(self)

    def combine(self, old: Any, new: Any, before: int, added: int, name: str) -> Any:
        """Factors of two windows: sums add up, the input factor (a mean) becomes the mean over both."""
        if old is None or new is None:
            return new if old is None else old
        total = before + added
        combined = [
            (o * before + n * added) / total if i == new.mean_index else o + n for i, (o, n) in enumerate(zip(old, new))
        ]
        return KroneckerFactors(combined, new.mean_index)

    def missing_rule(self, method: RuleMethod, module_name: str, module: nn.Module) -> str:
        """The error for a module without a Kronecker rule, naming the fallback that avoids it."""
        name = type(self).__name__
        return (
            f"{name}: module '{module_name}' ({type(module).__name__}) has trainable "
            f"parameters but no Kronecker rule. Pass {name}(fallback='diagonal') to attach the exact "
            "diagonal of their block instead, or freeze them with requires_grad_(False)."
        )


@dataclass(frozen=True)
class KFLR(KroneckerQuantity):
    r"""Kronecker factors of the GGN / exact Fisher blocks (exact loss-Hessian square-root columns).

    :math:`B \otimes A` approximates the block of :math:`G = c \sum_n J_n^\top (\partial^2
    \ell_n / \partial f_n^2) J_n`, the matrix whose diagonal is :class:`DiagGGNExact`.
    See :class:`KroneckerQuantity` for the factors and options.
    """

    attribute: ClassVar[str] = "kflr"
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)
    order: ClassVar[Order] = Order.SECOND

    @property
    def needs(self) -> Needs:
        """The exact loss-Hessian square-root columns."""
        return self._needs(Columns.EXACT)


@dataclass(frozen=True)
class KFAC(KroneckerQuantity):
    r"""Kronecker factors of the Monte-Carlo Fisher blocks.

    :math:`B` is built from ``mc_samples`` sampled columns per example (the gradient of
    the loss at a target drawn from the model's predictive distribution, scaled by
    :math:`1/\sqrt{M}`), so :math:`E[B] \otimes A` equals :class:`KFLR`'s product
    exactly. See :class:`KroneckerQuantity` for the factors and options.

    Attributes:
        mc_samples: Number of samples per example, at least 1.
        generator: Optional :class:`torch.Generator` that makes the samples reproducible.
    """

    mc_samples: int = 1
    generator: torch.Generator | None = field(default=None, compare=False)

    attribute: ClassVar[str] = "kfac"
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(1)
    order: ClassVar[Order] = Order.SECOND

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.mc_samples, int) or self.mc_samples < 1:
            raise ValueError(f"KFAC(mc_samples=...) must be a positive int, got {self.mc_samples!r}.")

    @property
    def needs(self) -> Needs:
        """``mc_samples`` sampled columns per example."""
        return self._needs(Columns.SAMPLED, self.mc_samples, self.generator)


@dataclass(frozen=True)
class KFACEmpirical(KroneckerQuantity):
    r"""Kronecker factors of the empirical Fisher blocks (the gradient column).

    :math:`B` is built from the gradient of :math:`L` at the layer output, so
    :math:`B \otimes A` approximates :math:`\sum_n (c \nabla \ell_n)(c \nabla \ell_n)^\top`,
    the matrix whose diagonal is :class:`SumGradSquared` (divide by :math:`c` for the
    empirical Fisher :math:`c \sum_n \nabla \ell_n \nabla \ell_n^\top`). Needs no curvature
    columns. See :class:`KroneckerQuantity` for the factors and options.
    """

    attribute: ClassVar[str] = "kfac_empirical"
    shard_scaling: ClassVar[ShardScaling | None] = ShardScaling(2)
    order: ClassVar[Order] = Order.FIRST

    @property
    def needs(self) -> Needs:
        """The gradient captured in the ordinary backward pass."""
        return self._needs(Columns.GRADIENT)


@dataclass(frozen=True)
class EKFAC(KroneckerQuantity):
    r"""Eigenvalue-corrected Kronecker factors of the GGN blocks (George et al., 2018).

    With the factors of :class:`KFLR` (same options) decomposed as
    :math:`A = Q_A \Lambda_A Q_A^\top` and :math:`B = Q_B \Lambda_B Q_B^\top`, a weight's block
    is approximated by :math:`(Q_B \otimes Q_A) \operatorname{diag}(\operatorname{vec} S)
    (Q_B \otimes Q_A)^\top` with the per-example corrected diagonal

    .. math:: S = \sum_{v,n} w_{vn} \big(Q_B^\top G_{vn} Q_A\big)^{\odot 2},

    :math:`G_{vn}` the ``[O, I']`` gradient of example :math:`n` for loss-Hessian column
    :math:`v` (summed over the calls of the module first): :math:`S` is exactly the diagonal
    of the GGN block in the Kronecker eigenbasis, so the approximation keeps the block's
    projection onto that basis. Attribute ``ekfac``: ``[Q_B, Q_A, S]`` for a weight
    (``[Q_A, Q_B, S]`` with ``S`` ``[E, D]`` for an embedding, input first), ``[Q_B, s]``
    for a bias; grouped convolutions carry a leading group axis on all three. Costs a
    second pass of the columns, which materializes per-example gradients one column at a time.
    """

    attribute: ClassVar[str] = "ekfac"
    order: ClassVar[Order] = Order.SECOND

    @property
    def needs(self) -> Needs:
        """The exact columns (twice: for the factors, then one at a time for the corrected diagonals)."""
        return self._needs(Columns.EXACT)

    def sink(self) -> Sink:
        """:class:`~secorder_hooks.quantities.kron_factors.EkfacSums`."""
        return EkfacSums(self)

    def combine(self, old: Any, new: Any, before: int, added: int, name: str) -> Any:
        """Raise when two windows of eigenbases meet (a fallback diagonal adds up)."""
        if old is not None and new is not None and len(new) > 1:
            raise ExtensionError(
                f"parameter '{name}': EKFAC's eigenbases of one backward pass cannot be combined with another's. Call "
                "model.zero_grad() between the passes, or pass extend(..., accumulate=False)."
            )
        return super().combine(old, new, before, added, name)
