r"""The loss as seen by the curvature quantities: square roots of its Hessian.

A :class:`LossTerm` describes :math:`L = c \sum_n \ell_n(f_n)` as a function of the
tensor :math:`f` at a gradient edge of the model graph (the model output, or the logits
before a ``log_softmax`` folded into the loss). Its Hessian with respect to :math:`f` is
block diagonal over examples; a term provides columns :math:`s_k` (``[K, N, *f]``) and
optional signs/weights :math:`w_{kn}` with

.. math::
    \sum_k w_{kn}\, s_{kn} s_{kn}^\top = \frac{\partial^2 L}{\partial f_n^2}
    \quad\text{for every example } n,

the reduction factor :math:`c` included. Monte-Carlo columns satisfy the same identity
in expectation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses.kinds import LossKind, Reduction

__all__ = [
    "LossCall",
    "LossTerm",
    "SqrtColumns",
    "edge_of",
    "diagonal_sqrt_columns",
    "one_hot_columns",
    "signed_sqrt",
]


def edge_of(tensor: Tensor) -> GradientEdge | None:
    """Gradient edge of ``tensor`` (``None`` where it does not require grad)."""
    return get_gradient_edge(tensor) if tensor.requires_grad else None


def signed_sqrt(factors: Tensor, nonnegative: bool = False) -> tuple[Tensor, Tensor | None]:
    """``(sqrt(|a|), sign(a))`` of Hessian factors ``a``; the sign is ``None`` where all ``a >= 0``.

    Args:
        factors: The factors ``a``.
        nonnegative: The caller knows that ``a >= 0`` (skips the check).
    """
    if not nonnegative and bool((factors < 0).any()):
        return factors.abs().sqrt(), factors.sign()
    return factors.sqrt(), None


@dataclass(frozen=True)
class SqrtColumns:
    """Columns of a loss-Hessian square root.

    Attributes:
        columns: ``[K, N, *f]``.
        weights: ``[K, N]`` weight (usually a sign) of each column, or ``None`` for all 1.
    """

    columns: Tensor
    weights: Tensor | None = None


@dataclass(eq=False)
class LossCall:
    """One call of a recognized loss function (see :func:`~secorder_hooks.losses.calls.standard_loss`).

    Attributes:
        loss: The term class registered for the function called (its :attr:`~LossTerm.function`).
        input: The prediction passed to the loss (logits, log-probabilities or outputs).
        target: The target passed to the loss.
        options: Remaining keyword arguments after normalization (``reduction``,
            ``weight``, ``ignore_index``, ``label_smoothing``, ``pos_weight``).
        result: The loss tensor the call returned (``None`` before it ran).
    """

    loss: type[LossTerm]
    input: Tensor
    target: Tensor
    options: dict[str, Any]
    result: Tensor | None

    @property
    def kind(self) -> LossKind | None:
        """The likelihood of the loss called (``None`` for a loss of another likelihood)."""
        return self.loss.kind

    @property
    def reduction(self) -> Reduction:
        """The call's reduction.

        Raises:
            UnsupportedLossOptionError: ``reduction="none"`` (the curvature needs a scalar loss).
        """
        return Reduction.parse(self.options.get("reduction", "mean"), f"{self.name}: reduction")

    @property
    def name(self) -> str:
        """The name of the loss function called (e.g. ``"cross_entropy"``), for messages."""
        return self.loss.function.__name__  # type: ignore[union-attr]


class LossTerm(ABC):
    """The loss as a function of the tensor at :attr:`edge`.

    Attributes:
        edge: Gradient edge of the tensor :math:`f` at which columns enter the model graph.
        shape: Shape ``[N, *f]`` of that tensor.
        name: Human-readable name used in error messages.
    """

    edge: GradientEdge | None
    shape: torch.Size
    name: str = "loss"

    function: ClassVar[Callable[..., Tensor] | None] = None
    """The PyTorch loss function this term stands for (set by
    :func:`~secorder_hooks.losses.calls.standard_loss`; ``None`` for terms of no standard loss)."""
    kind: ClassVar[LossKind | None] = None
    """The likelihood of :attr:`function` (set with it)."""

    @classmethod
    def from_call(cls, call: LossCall) -> LossTerm:
        """The term of a recorded call of :attr:`function` whose result is the loss.

        Raises:
            UnsupportedLossError: The call's options make the curvature unavailable.
            LossInputError: Invalid target or option shapes.
        """
        raise NotImplementedError(f"{cls.__name__} is not the term of a standard loss function.")

    @classmethod
    def check_targets(cls, call: LossCall) -> None:
        """Raise a package error for targets that do not fit the call's prediction, before it runs.

        Raises:
            LossInputError: Shapes that PyTorch would broadcast silently or reject later.
            LossDtypeError: A target dtype the loss does not accept.
        """
        raise NotImplementedError(f"{cls.__name__} is not the term of a standard loss function.")

    @classmethod
    def averaged_terms(cls, call: LossCall) -> float:
        r"""How many terms ``reduction="mean"`` averages over in ``call``: :math:`1/c`.

        Zero when every term is ignored (the mean is undefined).
        """
        raise NotImplementedError(f"{cls.__name__} is not the term of a standard loss function.")

    @abstractmethod
    def sqrt_hessian(self) -> SqrtColumns:
        """Exact columns of the square root of the loss Hessian (scale ``c`` included)."""

    def sample_sqrt_hessian(self, mc_samples: int, generator: torch.Generator | None = None) -> Tensor:
        r"""``[M, N, *f]`` sampled columns with :math:`E[\sum_m s_m s_m^\top] = \partial^2 L / \partial f^2`.

        Each column is the gradient of the loss at a target sampled from the model's
        predictive distribution, times ``1 / sqrt(mc_samples)`` (never the loss divided by
        ``mc_samples``).

        Raises:
            UnsupportedLossError: The loss has no known likelihood to sample from.
        """
        raise UnsupportedLossError(
            f"Monte-Carlo curvature needs a loss with a known likelihood (cross-entropy, NLL over log-softmax, "
            f"MSE, BCE with logits); {self.name} has none. Use DiagGGNExact instead."
        )


def one_hot_columns(shape: torch.Size, scale: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[K, N, *f]`` columns ``scale * e_k`` for every element ``k`` of ``f`` (``K = prod(f)``).

    Args:
        shape: ``[N, *f]``.
        scale: Broadcastable to ``[N, *f]``; column ``k`` carries ``scale[..., k]`` at element ``k``.
        dtype: Dtype of the columns.
        device: Device of the columns.
    """
    n, k = shape[0], int(torch.Size(shape[1:]).numel())
    eye = torch.eye(k, dtype=dtype, device=device)  # [K, K]
    cols = eye.unsqueeze(1).expand(k, n, k) * torch.as_tensor(scale, dtype=dtype, device=device).expand(shape).reshape(
        1, n, k
    )
    return cols.reshape(k, *shape)


def diagonal_sqrt_columns(hessian_diagonal: Tensor, nonnegative: bool = False) -> SqrtColumns:
    r"""Exact columns of an elementwise (diagonal) loss Hessian.

    Args:
        hessian_diagonal: ``[N, *f]``, :math:`h` with :math:`\partial^2 L / \partial f^2 = \operatorname{diag}(h)`.
        nonnegative: The caller knows that :math:`h \ge 0` (skips the check).

    Returns:
        ``K = prod(f)`` columns ``sqrt(|h_k|) e_k`` (``[K, N, *f]``) with weights ``sign(h_k)``
        (``[K, N]``, ``None`` where ``h >= 0``).
    """
    scale, sign = signed_sqrt(hessian_diagonal, nonnegative)
    columns = one_hot_columns(hessian_diagonal.shape, scale, hessian_diagonal.dtype, hessian_diagonal.device)
    weights = None if sign is None else sign.reshape(hessian_diagonal.shape[0], -1).T
    return SqrtColumns(columns, weights)
