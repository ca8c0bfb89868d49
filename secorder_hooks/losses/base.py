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
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from secorder_hooks.errors import UnsupportedLossError

__all__ = ["LossTerm", "SqrtColumns", "one_hot_columns"]


@dataclass(frozen=True)
class SqrtColumns:
    """Columns of a loss-Hessian square root.

    Attributes:
        columns: ``[K, N, *f]``.
        weights: ``[K, N]`` weight (usually a sign) of each column, or ``None`` for all 1.
    """

    columns: Tensor
    weights: Tensor | None = None


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
