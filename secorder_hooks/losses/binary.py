r"""Binary cross-entropy with logits, elementwise over :math:`f` ``[N, *f]``.

Per element :math:`\ell = -w\,[\,\rho\, y \log \sigma(f) + (1-y) \log(1 - \sigma(f))\,]` with
``weight`` :math:`w` and ``pos_weight`` :math:`\rho` (broadcast along the last axis), so

.. math::
    \frac{\partial^2 L}{\partial f^2} = \operatorname{diag}\big(c\, w\, (\rho y + 1 - y)\,
    \sigma(f)(1 - \sigma(f))\big),

with :math:`c = 1/\text{numel}` (``mean``, regardless of ``weight``) or 1 (``sum``). Monte-Carlo
columns :math:`\sqrt{c\, w (\rho y + 1 - y) / M}\,(\sigma(f) - \tilde y)` with
:math:`\tilde y \sim \text{Bernoulli}(\sigma(f))` are unbiased for this Hessian (without ``pos_weight``
they are the loss gradient at the sampled target).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from secorder_hooks.errors import LossInputError, UnsupportedLossError
from secorder_hooks.losses.base import LossCall, LossTerm, SqrtColumns, diagonal_sqrt_columns, edge_of
from secorder_hooks.losses.calls import standard_loss
from secorder_hooks.losses.kinds import LossKind, Reduction
from secorder_hooks.losses.regression import check_elementwise_targets

__all__ = ["BCEWithLogitsLossTerm"]


@standard_loss(F.binary_cross_entropy_with_logits, LossKind.BCE, loss_type=True)
class BCEWithLogitsLossTerm(LossTerm):
    """``F.binary_cross_entropy_with_logits(logits, target, ...)`` as a function of ``logits`` ``[N, *f]``.

    Raises:
        UnsupportedLossError: ``logits`` has no batch axis.
        LossInputError: ``target`` does not have the shape of ``logits``.
    """

    def __init__(
        self,
        logits: Tensor,
        target: Tensor,
        *,
        weight: Tensor | None = None,
        pos_weight: Tensor | None = None,
        reduction: str | Reduction = "mean",
    ) -> None:
        self.name = "binary_cross_entropy_with_logits"
        red = Reduction.parse(reduction, f"{self.name}: reduction")
        if logits.dim() == 0:
            raise UnsupportedLossError(f"{self.name} on a 0-d input: pass a batch [N, *f]; dim 0 is the example axis.")
        if target.shape != logits.shape:
            raise LossInputError(
                f"{self.name}: target shape {tuple(target.shape)} must equal input shape {tuple(logits.shape)}."
            )
        x = logits.detach()
        y = target.detach().to(x.dtype)
        factor = torch.ones_like(x) if pos_weight is None else pos_weight.detach().to(x.dtype) * y + 1.0 - y
        if weight is not None:
            factor = factor * weight.detach().to(x.dtype)
        if red is Reduction.MEAN:
            factor = factor / x.numel()
        #: ``[N, *f]`` :math:`c\, w (\rho y + 1 - y)`.
        self.factor = factor.expand(x.shape)
        #: ``[N, *f]`` :math:`\sigma(f)`.
        self.probs = torch.sigmoid(x)
        self.edge, self.shape = edge_of(logits), logits.shape

    @classmethod
    def from_call(cls, call: LossCall) -> BCEWithLogitsLossTerm:
        """The term of a recorded ``F.binary_cross_entropy_with_logits`` call."""
        opts = call.options
        return cls(
            call.input,
            call.target,
            weight=opts.get("weight"),
            pos_weight=opts.get("pos_weight"),
            reduction=opts.get("reduction", "mean"),
        )

    @classmethod
    def check_targets(cls, call: LossCall) -> None:
        """Floating targets of the prediction's shape."""
        check_elementwise_targets(call)

    @classmethod
    def averaged_terms(cls, call: LossCall) -> float:
        """The elements of the prediction (``weight`` does not change the mean's divisor)."""
        return float(call.input.numel())

    def sqrt_hessian(self) -> SqrtColumns:
        """``K = prod(f)`` one-hot columns (``[K, N, *f]``) of the diagonal Hessian."""
        return diagonal_sqrt_columns(self.factor * self.probs * (1.0 - self.probs))

    def sample_sqrt_hessian(self, mc_samples: int, generator: torch.Generator | None = None) -> Tensor:
        r"""``[M, N, *f]`` cols :math:`\sqrt{\text{factor}/M}\,(\sigma(f) - \tilde y)`, Bernoulli :math:`\tilde y`."""
        if bool((self.factor < 0).any()):
            raise UnsupportedLossError(
                f"{self.name}: Monte-Carlo sampling needs non-negative weight * (pos_weight * y + 1 - y)."
            )
        p = self.probs.expand(mc_samples, *self.probs.shape)
        sampled = torch.bernoulli(p, generator=generator)
        return (p - sampled) * (self.factor / mc_samples).sqrt()
