r"""The kinds of loss the package knows, and the reductions it accepts.

:class:`LossKind` is the likelihood behind a loss: it is what the function API's
``loss_type`` names, and what every recognized loss function
(``secorder_hooks.losses.calls``) is registered under. :class:`Reduction` is how a
loss is reduced to a scalar :math:`L = c \sum_n \ell_n`.
"""

from __future__ import annotations

from secorder_hooks.enums import ChoiceEnum
from secorder_hooks.errors import SecorderError, UnsupportedLossOptionError

__all__ = ["LossKind", "Reduction"]


class LossKind(ChoiceEnum):
    """Likelihoods with closed-form loss-Hessian square roots (the function API's ``loss_type``).

    * ``NLL`` (``"nll"``, alias ``"cross_entropy"``): categorical; ``F.cross_entropy`` on
      logits and ``F.nll_loss`` on ``log_softmax`` outputs.
    * ``MSE`` (``"mse"``, alias ``"gaussian"``): ``F.mse_loss`` (Gaussian with variance 1/2).
    * ``BCE`` (``"bce"``, alias ``"bernoulli"``): ``F.binary_cross_entropy_with_logits``.
    """

    NLL = "nll"
    MSE = "mse"
    BCE = "bce"

    @classmethod
    def aliases(cls) -> dict[str, LossKind]:
        """``"cross_entropy"``, ``"gaussian"``, ``"bernoulli"``."""
        return {"cross_entropy": cls.NLL, "gaussian": cls.MSE, "bernoulli": cls.BCE}

    @classmethod
    def invalid_choice_error(cls) -> type[SecorderError]:
        """:class:`~secorder_hooks.errors.UnsupportedLossOptionError` (a ``NotImplementedError``)."""
        return UnsupportedLossOptionError


class Reduction(ChoiceEnum):
    r"""Reductions that give a scalar loss :math:`L = c \sum_n \ell_n`."""

    MEAN = "mean"
    SUM = "sum"

    @classmethod
    def invalid_choice_error(cls) -> type[SecorderError]:
        """:class:`~secorder_hooks.errors.UnsupportedLossOptionError` (``"none"`` is valid PyTorch)."""
        return UnsupportedLossOptionError

    @classmethod
    def hint(cls, value: object) -> str:
        """Why ``"none"`` is refused."""
        return " Curvature quantities need a scalar loss." if str(value).strip().lower() == "none" else ""
