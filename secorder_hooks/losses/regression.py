r"""Mean squared error: :math:`L = c \sum_i w_i (f_i - y_i)^2` over all elements :math:`i`.

Its Hessian is diagonal, :math:`2 c\, \operatorname{diag}(w)`; ``mean`` uses
:math:`c = 1/\text{numel}` (or :math:`1 / \sum_i w_i` with ``weight``, as ``F.mse_loss`` does), ``sum``
:math:`c = 1`. The likelihood behind Monte-Carlo sampling is a Gaussian with variance
:math:`1/2` per element, so that :math:`E[\text{MC}] = 2c\,\operatorname{diag}(w)` exactly for the loss
as written (no factor 1/2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses.base import LossInputError, LossTerm, Reduction, SqrtColumns, diagonal_sqrt_columns, edge_of

__all__ = ["MSELossTerm"]


class MSELossTerm(LossTerm):
    """``F.mse_loss(input, target, reduction=..., weight=...)`` as a function of ``input`` ``[N, *f]``.

    Raises:
        UnsupportedLossError: ``input`` has no batch axis or ``target`` would broadcast.
        LossInputError: ``weight`` does not have the input's shape.
    """

    def __init__(
        self,
        input: Tensor,
        target: Tensor,
        *,
        reduction: str | Reduction = "mean",
        weight: Tensor | None = None,
    ) -> None:
        self.name = "mse_loss"
        red = Reduction.parse(reduction, self.name)
        if input.dim() == 0:
            raise UnsupportedLossError(f"{self.name} on a 0-d input: pass a batch [N, *f]; dim 0 is the example axis.")
        if target.shape != input.shape:
            raise UnsupportedLossError(
                f"{self.name}: target shape {tuple(target.shape)} differs from input shape {tuple(input.shape)}; "
                f"broadcasting makes the loss couple elements. Reshape the target to the input's shape."
            )
        x = input.detach()
        #: :math:`2 c` when there is no ``weight`` (the Hessian is a multiple of the identity), else ``None``.
        self.uniform_factor: float | None = None
        if weight is None:
            self.uniform_factor = 2.0 / x.numel() if red is Reduction.MEAN else 2.0
            #: ``[N, *f]`` diagonal of the loss Hessian, :math:`2 c w`.
            self.hessian_diagonal = torch.full_like(x, self.uniform_factor)
        else:
            if weight.shape != input.shape:
                raise LossInputError(
                    f"{self.name}: weight shape {tuple(weight.shape)} must equal input shape {tuple(input.shape)}."
                )
            w = weight.detach().to(x.dtype)
            c = 1.0 / w.sum() if red is Reduction.MEAN else 1.0
            self.hessian_diagonal = 2.0 * c * w
        self.edge, self.shape = edge_of(input), input.shape

    def sqrt_hessian(self) -> SqrtColumns:
        """``K = prod(f)`` one-hot columns ``sqrt(2 c w_k) e_k`` (``[K, N, *f]``)."""
        return diagonal_sqrt_columns(self.hessian_diagonal, nonnegative=self.uniform_factor is not None)

    def sample_sqrt_hessian(self, mc_samples: int, generator: torch.Generator | None = None) -> Tensor:
        r"""``[M, N, *f]`` columns :math:`\sqrt{2 c w / M}\, z`, :math:`z \sim \mathcal N(0, I)`.

        This is :math:`\sqrt{c\,w} \cdot 2 (f - \tilde y) / \sqrt M` for :math:`\tilde y \sim \mathcal N(f, I/2)`:
        the per-element loss gradient at a sampled target.
        """
        h = self.hessian_diagonal
        z = torch.randn((mc_samples, *h.shape), dtype=h.dtype, device=h.device, generator=generator)
        if self.uniform_factor is not None:
            return z.mul_(math.sqrt(self.uniform_factor / mc_samples))
        if bool((h < 0).any()):
            raise UnsupportedLossError(f"{self.name}: Monte-Carlo sampling needs non-negative weights.")
        return z * (h / mc_samples).sqrt()
