r"""Curvature backends for `laplace-torch <https://github.com/aleximmer/Laplace>`_ 0.3 computed by the hook engine.

Pass :class:`SecorderGGN` (GGN / Fisher) or :class:`SecorderEF` (empirical Fisher) as
``backend=`` to ``laplace.Laplace``; ``hessian_structure="diag"`` and ``"kron"`` use the
engine (one ordinary ``loss.backward()`` per batch; for last-layer Laplace, laplace's
default, of the last layer on features computed without a graph), everything else (Jacobians of the GLM
predictive, per-example gradients, ``"full"``) is laplace's own torch.func implementation.

Scaling (laplace's, for the *summed* loss ``lossfunc`` = ``CrossEntropyLoss(reduction="sum")``
or ``MSELoss(reduction="sum")`` with ``factor`` 1 or 1/2): per batch of :math:`M` of the
:math:`N` training examples,

* ``diag`` returns ``factor * diag_ggn_exact`` (``diag_ggn_mc`` if ``stochastic``), i.e.
  :math:`\sum_n J_n^\top (\operatorname{diag} p_n - p_n p_n^\top) J_n` for classification and
  :math:`\sum_n J_n^\top J_n` for regression;
* ``kron`` returns ``laplace.utils.Kron`` with ``[B, A * M / N]`` per weight (``[A * M / N, B]``
  for an embedding, whose rows index the input) and ``[B]`` per bias from
  :class:`~secorder_hooks.KFLR` (:class:`~secorder_hooks.KFAC` if ``stochastic``), times
  ``factor``, so that summing the factors over batches gives
  :math:`(\sum B) \otimes (\text{mean } A)`, as laplace's BackPACK and curvlinops backends do.

Unlike laplace's own backends, any graph works (residual connections, functional ops,
in-place activations), ``nn.Embedding`` has Kronecker factors, and layers without a
Kronecker rule (BatchNorm in eval mode, ...) get the exact diagonal of their block
(``fallback="diagonal"``) instead of failing: a 1-D parameter's block is then the
diagonal matrix; a parameter of two or more dims without a Kronecker rule cannot be put
in laplace's format and raises.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from secorder_hooks.engine.extend import extend
from secorder_hooks.errors import UnsupportedModuleError
from secorder_hooks.quantities import (
    KFAC,
    KFLR,
    DiagGGNExact,
    DiagGGNMC,
    KFACEmpirical,
    KroneckerQuantity,
    KronFallback,
    Quantity,
    SumGradSquared,
    WeightSharing,
)
from secorder_hooks.rules import rule_for

try:
    from laplace.curvature import EFInterface, GGNInterface
    from laplace.utils import Kron
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "secorder_hooks.integrations.laplace needs laplace-torch 0.3: pip install 'secorder_hooks[laplace]'."
    ) from err

__all__ = ["SecorderGGN", "SecorderEF"]


class _SecorderInterface:
    """What both backends share: one engine backward per batch and the conversion to laplace's formats.

    Keyword arguments beyond laplace's (pass them as ``backend_kwargs``):

    Args:
        sharing: :class:`~secorder_hooks.WeightSharing` of the Kronecker factors (default expand).
        fallback: :class:`~secorder_hooks.KronFallback` for layers without a Kronecker rule
            (default: their exact diagonal).
    """

    model: nn.Module
    _model: nn.Module
    likelihood: str
    lossfunc: nn.Module
    factor: float
    params: list[nn.Parameter]
    last_layer: bool
    subnetwork_indices: Tensor | None

    def _init_options(self, sharing: WeightSharing | str, fallback: KronFallback | str) -> None:
        self.sharing = WeightSharing.parse(sharing, "sharing")
        self.fallback = KronFallback.parse(fallback, "fallback")

    def _forward(self, x: Tensor) -> Tensor:
        """The model output; for last-layer Laplace, the last layer applied to features computed without graph."""
        if not self.last_layer:
            return self.model(x)
        with torch.no_grad():
            _, features = self.model.forward_with_features(x)
        return self._model(features)

    def _run(self, x: Tensor, y: Tensor, quantity: Quantity) -> tuple[Tensor, list[Any]]:
        """``(factor * loss, [p.<attribute> for p in params])`` of one backward inside ``extend()``.

        ``.grad`` of the parameters is left as it was.
        """
        if isinstance(x, MutableMapping):
            raise TypeError(f"{type(self).__name__} takes tensor inputs, not {type(x).__name__}.")
        grads = [p.grad for p in self.params]
        try:
            for p in self.params:
                p.grad = None
            with extend(self._model, quantity):
                f = self._forward(x)
                if self.likelihood == "classification":  # as laplace's BackPACK backend: classes last
                    f, y = f.reshape(-1, f.shape[-1]), y.reshape(-1)
                loss = self.lossfunc(f, y)
                loss.backward()
            values = []
            for p in self.params:
                values.append(getattr(p, quantity.attribute, None))
                if hasattr(p, quantity.attribute):
                    delattr(p, quantity.attribute)
        finally:
            for p, g in zip(self.params, grads):
                p.grad = g
        return self.factor * loss.detach(), values

    def _diag(self, x: Tensor, y: Tensor, quantity: Quantity) -> tuple[Tensor, Tensor]:
        loss, values = self._run(x, y, quantity)
        h = torch.cat([p.new_zeros(p.numel()) if v is None else v.flatten() for p, v in zip(self.params, values)])
        if self.subnetwork_indices is not None:
            h = h[self.subnetwork_indices]
        return loss, self.factor * h

    def _kron(self, x: Tensor, y: Tensor, n_data: int, quantity: KroneckerQuantity) -> tuple[Tensor, Kron]:
        loss, values = self._run(x, y, quantity)
        batch = y.numel() if self.likelihood == "classification" else len(y)
        input_first = {
            id(p): rule_for(m).kronecker_input_first for m in self._model.modules() for p in m.parameters(recurse=False)
        }
        kfacs: list[list[Tensor]] = []
        for p, factors in zip(self.params, values):
            if factors is None:  # not reached by this batch
                kfacs.append([p.new_zeros(p.numel(), p.numel())])
            elif len(factors) == 1:
                (f,) = factors
                if f.dim() == 1 and p.dim() > 1:
                    raise UnsupportedModuleError(
                        f"a parameter of shape {tuple(p.shape)} has no Kronecker rule; its exact diagonal is not a "
                        "Kronecker product of the two factors laplace's Kron expects for it. Use "
                        "hessian_structure='diag', or register a rule with kronecker_input/kronecker_output."
                    )
                kfacs.append([torch.diag(f) if f.dim() == 1 else f])
            else:
                b, a = factors[::-1] if input_first[id(p)] else factors
                if b.dim() != 2:
                    raise UnsupportedModuleError(
                        f"a parameter of shape {tuple(p.shape)} (a grouped convolution) has block-diagonal Kronecker "
                        "factors, one pair per group, which laplace's Kron cannot hold. Use hessian_structure='diag'."
                    )
                a = a * (batch / n_data)  # laplace sums factors over batches: A must average over the data
                kfacs.append([a, b] if input_first[id(p)] else [b, a])
        return loss, Kron(kfacs) * self.factor


class SecorderGGN(_SecorderInterface, GGNInterface):
    """laplace-torch backend for the GGN / Fisher: ``diag`` and ``kron`` by the hook engine.

    ``stochastic=False``: :class:`~secorder_hooks.DiagGGNExact` and :class:`~secorder_hooks.KFLR`;
    ``stochastic=True``: :class:`~secorder_hooks.DiagGGNMC` and :class:`~secorder_hooks.KFAC` with
    ``num_samples`` samples per example. See the module docstring for the scaling.
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        stochastic: bool = False,
        num_samples: int = 1,
        sharing: WeightSharing | str = WeightSharing.EXPAND,
        fallback: KronFallback | str = KronFallback.DIAGONAL,
    ) -> None:
        super().__init__(
            model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y, stochastic, num_samples
        )
        self._init_options(sharing, fallback)

    def diag(self, X: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:  # noqa: N803 (laplace's names)
        """``(loss, h)``: laplace's diagonal GGN of the summed batch loss, ``[P]``."""
        return self._diag(X, y, DiagGGNMC(self.num_samples) if self.stochastic else DiagGGNExact())

    def kron(self, X: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:  # noqa: N803
        """``(loss, Kron)``: Kronecker factors of the batch, with the input factors rescaled by ``M / N``."""
        options = {"sharing": self.sharing, "fallback": self.fallback}
        quantity = KFAC(mc_samples=self.num_samples, **options) if self.stochastic else KFLR(**options)
        return self._kron(X, y, N, quantity)


class SecorderEF(_SecorderInterface, EFInterface):
    """laplace-torch backend for the empirical Fisher: ``diag`` and ``kron`` by the hook engine.

    ``diag`` is ``factor * sum_grad_squared`` (:class:`~secorder_hooks.SumGradSquared`), ``kron``
    :class:`~secorder_hooks.KFACEmpirical` times ``factor``, of the summed loss (so the
    reduction factor is 1).
    """

    def __init__(
        self,
        model: nn.Module,
        likelihood: str,
        last_layer: bool = False,
        subnetwork_indices: torch.LongTensor | None = None,
        dict_key_x: str = "input_ids",
        dict_key_y: str = "labels",
        sharing: WeightSharing | str = WeightSharing.EXPAND,
        fallback: KronFallback | str = KronFallback.DIAGONAL,
    ) -> None:
        super().__init__(model, likelihood, last_layer, subnetwork_indices, dict_key_x, dict_key_y)
        self._init_options(sharing, fallback)

    def diag(self, X: Tensor, y: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:  # noqa: N803 (laplace's names)
        """``(loss, h)``: ``factor`` times the diagonal of the empirical Fisher of the summed batch loss."""
        return self._diag(X, y, SumGradSquared())

    def kron(self, X: Tensor, y: Tensor, N: int, **kwargs: Any) -> tuple[Tensor, Kron]:  # noqa: N803
        """``(loss, Kron)``: empirical Kronecker factors, input factors rescaled by ``M / N``."""
        return self._kron(X, y, N, KFACEmpirical(sharing=self.sharing, fallback=self.fallback))
