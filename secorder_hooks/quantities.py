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
    "WeightSharing",
    "KronFallback",
    "KroneckerQuantity",
    "KroneckerFactors",
    "KFLR",
    "KFAC",
    "KFACEmpirical",
    "EKFAC",
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
    KRONECKER = "kronecker"
    """Kronecker factors (a :class:`~secorder_hooks.quantities.KroneckerFactors` list): the output
    factors and diagonals add up, the input factor (a mean over examples) becomes the mean over
    all examples of the passes."""


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


# ----------------------------------------------------------------------------- Kronecker factors
class KroneckerFactors(list):
    """The list of factors a Kronecker quantity attaches, remembering which one is a mean.

    Attributes:
        mean_index: Position of the input factor :math:`A` (a mean over examples), ``None``
            for a bias, a fallback diagonal or EK-FAC's bases (sums only).
    """

    def __init__(self, factors: list[torch.Tensor], mean_index: int | None = None) -> None:
        super().__init__(factors)
        self.mean_index = mean_index


class WeightSharing(enum.Enum):
    r"""How a Kronecker factor treats the positions ``t`` a weight is shared over.

    Positions are the leading axes of a Linear layer's input ``[N, *, I]`` other than
    dim 0, and the output locations of a convolution (its input patches). The two
    approximations are those of Eschenhagen et al. (2023), as curvlinops defines them;
    with :math:`a_{nt}` the input (patch) at position :math:`t` of :math:`T` and
    :math:`g_{vnt}` column :math:`v` at the output:
    """

    EXPAND = "expand"
    r"""Positions count as extra examples, with :math:`A = \frac{1}{NT} \sum_{n,t} a_{nt} a_{nt}^\top`,
    :math:`B = \sum_{v,n,t} w_{vn} g_{vnt} g_{vnt}^\top`. Exact for linear models with a loss
    term per position."""
    REDUCE = "reduce"
    r"""Positions are pooled first, with :math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` with
    :math:`\bar a_n = \frac1T \sum_t a_{nt}`, :math:`B = \sum_{v,n} w_{vn} \bar g_{vn} \bar g_{vn}^\top`
    with :math:`\bar g_{vn} = \sum_t g_{vnt}`. Exact for linear models whose positions are
    averaged before the loss."""


class KronFallback(enum.Enum):
    """What a Kronecker quantity does for a parameter whose layer has no Kronecker rule."""

    ERROR = "error"
    """Raise :class:`~secorder_hooks.UnsupportedModuleError` when ``extend()`` starts."""
    DIAGONAL = "diagonal"
    """Attach ``[d]``: the exact diagonal ``d`` (1-D, ``p.numel()`` entries, row-major) of the
    parameter's block of the same curvature matrix (e.g. ``diag_ggn_exact.flatten()`` for
    :class:`KFLR`)."""


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
            value = getattr(self, name)
            if not isinstance(value, kind):
                try:
                    object.__setattr__(self, name, kind(value))
                except ValueError:
                    choices = [m.value for m in kind]
                    raise ValueError(
                        f"{type(self).__name__}({name}={value!r}): expected a {kind.__name__} or one of {choices}."
                    ) from None


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
