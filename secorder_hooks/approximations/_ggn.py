r"""The generalized Fisher (GGN) :math:`c \sum_n J_n^\top H_n J_n` of model outputs already computed.

If the outputs were computed inside :func:`secorder_hooks.extend`, the engine finishes
the job in one vectorized backward (``curvature_from_outputs``); otherwise
:func:`~secorder_hooks.approximations._generic.ggn_diagonal_from_columns` backpropagates
the loss-Hessian square-root columns through the graph of ``outputs``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from secorder_hooks.approximations._generic import ggn_diagonal_from_columns
from secorder_hooks.core._fallback import ENGINE_ERRORS, Backend, FallbackWarning, current_backend, engine_supports
from secorder_hooks.core._fallback import logger as _logger
from secorder_hooks.core._sync import sync_results, unwrap
from secorder_hooks.engine.sync import SyncOption, sync_group
from secorder_hooks.errors import ExtensionError, UnsupportedLossError
from secorder_hooks.losses.base import LossInputError, LossTerm
from secorder_hooks.losses.calls import LossCall, LossKind
from secorder_hooks.losses.factory import LossType, loss_term_from_type
from secorder_hooks.quantities import DiagGGNExact, DiagGGNMC, Quantity

__all__ = ["LossShapeError", "generalized_fisher"]

_CALL_KINDS = {LossType.NLL: LossKind.CROSS_ENTROPY, LossType.MSE: LossKind.MSE, LossType.BCE: LossKind.BCE_WITH_LOGITS}


class LossShapeError(UnsupportedLossError, LossInputError):
    """Outputs or targets whose shapes or dtypes the requested likelihood does not support.

    Both a ``NotImplementedError`` (the documented contract of the Fisher functions) and a
    ``ValueError``.
    """


def generalized_fisher(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str | LossType,
    create_graph: bool,
    reduction: str,
    mc_samples: int | None,
    generator: torch.Generator | None,
    caller: str,
    sync: SyncOption = None,
) -> list[Tensor]:
    """Diagonal of the exact (or, with ``mc_samples``, Monte-Carlo) GGN, aligned with ``model.parameters()``.

    With a process group from ``sync``, the diagonal of the global batch (:mod:`secorder_hooks.core._sync`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}.")
    group = sync_group(model, sync, caller)
    if group is not None and create_graph:
        raise ExtensionError(f"{caller}: create_graph=True cannot be synchronized across processes; pass sync=False.")
    kind = LossType.parse(loss_type)
    result = _generalized_fisher(model, outputs, targets, kind, create_graph, reduction, mc_samples, generator, caller)
    if group is None:
        return result
    call = LossCall(_CALL_KINDS[kind], outputs, targets, {"reduction": reduction}, outputs)
    return sync_results(result, call, outputs.shape[0], group)


def _generalized_fisher(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str | LossType,
    create_graph: bool,
    reduction: str,
    mc_samples: int | None,
    generator: torch.Generator | None,
    caller: str,
) -> list[Tensor]:
    model = unwrap(model)
    kind = LossType.parse(loss_type)
    if mc_samples is not None and (isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1):
        raise ValueError(f"{caller}: mc_samples must be a positive int or None, got {mc_samples!r}.")
    if not isinstance(outputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(f"{caller}: outputs and targets must be tensors.")
    if outputs.dim() > 0 and outputs.shape[0] == 0:
        raise ValueError(f"{caller}: outputs hold an empty batch (dim 0 has size 0).")
    if not outputs.requires_grad:
        raise ValueError(
            f"{caller}: outputs do not require grad; pass the outputs of a forward pass of the model run with "
            "gradients enabled (not under torch.no_grad(), not detached)."
        )
    try:
        _, term = loss_term_from_type(kind, outputs, targets, reduction)
    except LossInputError as err:
        raise LossShapeError(f"{caller}: {err}") from err
    except UnsupportedLossError as err:
        raise LossShapeError(f"{caller}: {err}") from err
    params = list(model.parameters())
    quantity: Quantity = DiagGGNExact() if mc_samples is None else DiagGGNMC(mc_samples, generator)
    if not create_graph and engine_supports(second_order=True):
        try:
            found = _engine(outputs, term, quantity, params)
        except ENGINE_ERRORS as err:
            if current_backend() is Backend.ENGINE:
                raise
            warnings.warn(
                FallbackWarning(
                    f"{caller}: the engine declined ({type(err).__name__}: {err}); using the generic path."
                ),
                stacklevel=4,
            )
            found = None
        if found is not None:
            return [torch.zeros_like(p).detach() if v is None else v for v, p in zip(found, params)]
    _logger.debug("%s: generic path", caller)
    sqrt = term.sqrt_hessian() if mc_samples is None else None
    columns = sqrt.columns if sqrt is not None else term.sample_sqrt_hessian(mc_samples, generator)
    weights = sqrt.weights if sqrt is not None else None
    active = [i for i, p in enumerate(params) if p.requires_grad]
    result = [torch.zeros_like(p).detach() for p in params]
    diag = ggn_diagonal_from_columns(outputs, [params[i] for i in active], columns, weights, create_graph)
    for i, d in zip(active, diag):
        if d is not None:
            result[i] = d
    return result


def _engine(outputs: Tensor, term: LossTerm, quantity: Quantity, params: list[Tensor]) -> list[Tensor | None] | None:
    """The engine's result, or ``None`` if the engine did not record ``outputs``."""
    try:
        from secorder_hooks.engine.curvature import curvature_from_outputs
    except ImportError:
        return None
    try:
        found = curvature_from_outputs(outputs, term, quantity)
    except LookupError:
        return None
    _logger.debug("generalized Fisher: engine path")
    return [found.get(id(p)) for p in params]
