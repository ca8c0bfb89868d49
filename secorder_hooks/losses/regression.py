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
import torch.nn.functional as F
from torch import Tensor

from secorder_hooks.errors import LossDtypeError, LossInputError, UnsupportedLossError
from secorder_hooks.losses.base import LossCall, LossTerm, SqrtColumns, diagonal_sqrt_columns, edge_of
from secorder_hooks.losses.calls import standard_loss
from secorder_hooks.losses.kinds import LossKind, Reduction

__all__ = ["MSELossTerm", "check_elementwise_targets"]


@standard_loss(F.mse_loss, LossKind.MSE, loss_type=True)
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
        red = Reduction.parse(reduction, f"{self.name}: reduction")
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

    @classmethod
    def from_call(cls, call: LossCall) -> MSELossTerm:
        """The term of a recorded ``F.mse_loss`` call."""
        opts = call.options
        return cls(call.input, call.target, reduction=opts.get("reduction", "mean"), weight=opts.get("weight"))

    @classmethod
    def check_targets(cls, call: LossCall) -> None:
        """Floating targets of the prediction's shape."""
        check_elementwise_targets(call)

    @classmethod
    def averaged_terms(cls, call: LossCall) -> float:
        r"""The elements of the prediction, or :math:`\sum_i w_i` with ``weight`` (as ``F.mse_loss`` divides)."""
        weight = call.options.get("weight")
        return float(call.input.numel() if weight is None else weight.sum())

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


def check_elementwise_targets(call: LossCall) -> None:
    """Floating targets of the prediction's shape (no broadcasting) for an elementwise loss."""
    x, y, name = call.input, call.target, call.name
    if not y.is_floating_point():
        raise LossDtypeError(
            f"{name} needs floating-point targets, got dtype {y.dtype} (convert with target.to(input.dtype))."
        )
    if y.shape != x.shape:
        note = (
            ""
            if y.dim() == 0 or x.dim() == 0 or y.shape[0] == x.shape[0]
            else (f" (batch size {y.shape[0]} against {x.shape[0]}: dim 0 is the example axis)")
        )
        raise LossInputError(
            f"{name} got prediction {tuple(x.shape)} and targets {tuple(y.shape)}{note}; the shapes must be equal "
            "(PyTorch would broadcast them, which computes a different loss)."
        )
