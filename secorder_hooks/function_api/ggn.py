r"""The generalized Fisher (GGN) diagonal :math:`\operatorname{diag}(c \sum_n J_n^\top H_n J_n)`, exact or Monte-Carlo.

Two entry points, both with the engine path first:

* :func:`generalized_fisher`: of model outputs already computed, for a likelihood
  ``loss_type``. If the outputs were computed inside :func:`secorder_hooks.extend`, the
  engine finishes the job in one vectorized backward
  (:func:`~secorder_hooks.engine.curvature.curvature_from_outputs`); otherwise
  :func:`~secorder_hooks.function_api.vector_products.ggn_diagonal_from_columns`
  backpropagates the loss-Hessian square-root columns through the graph of ``outputs``.
* :func:`ggn_of_loss`: of ``loss_fn(model(inputs), targets)``: one engine pass, or the
  columns of the loss term (closed form for one standard loss call, with sampling for the
  Monte-Carlo Fisher; from autograd for any other loss summing over examples, exact GGN
  only) backpropagated from the model output.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

from secorder_hooks.engine.curvature import curvature_from_outputs
from secorder_hooks.engine.sync import SyncOption, sync_group
from secorder_hooks.errors import ExtensionError, LossInputError, LossShapeError, UnsupportedLossError
from secorder_hooks.function_api.backend import engine_or_autograd
from secorder_hooks.function_api.engine_pass import run_engine
from secorder_hooks.function_api.sync import sync_results, unwrap
from secorder_hooks.function_api.validation import ModelInputs, check_scalar
from secorder_hooks.function_api.vector_products import ggn_diagonal_from_columns
from secorder_hooks.losses.autograd import AutogradLossTerm
from secorder_hooks.losses.base import LossCall, LossTerm
from secorder_hooks.losses.factory import loss_call_from_type, loss_term_from_call
from secorder_hooks.losses.kinds import LossKind
from secorder_hooks.losses.recognition import record_loss_calls
from secorder_hooks.quantities import DiagGGNExact, DiagGGNMC, Quantity

__all__ = ["generalized_fisher", "ggn_of_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def generalized_fisher(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str | LossKind,
    create_graph: bool,
    reduction: str,
    mc_samples: int | None,
    generator: torch.Generator | None,
    caller: str,
    sync: SyncOption = None,
) -> list[Tensor]:
    """Diagonal of the exact (or, with ``mc_samples``, Monte-Carlo) GGN, aligned with ``model.parameters()``.

    With a process group from ``sync``, the diagonal of the global batch (:mod:`secorder_hooks.function_api.sync`).

    Raises:
        LossShapeError: Unknown ``loss_type`` or ``reduction``, outputs or targets the likelihood does not take.
        ValueError: ``outputs`` without a graph, an empty batch, ``mc_samples < 1``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}.")
    group = sync_group(model, sync, caller)
    if group is not None and create_graph:
        raise ExtensionError(f"{caller}: create_graph=True cannot be synchronized across processes; pass sync=False.")
    model = unwrap(model)
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
        call = loss_call_from_type(loss_type, outputs, targets, reduction)
        term = loss_term_from_call(call)
    except (LossInputError, UnsupportedLossError) as err:
        raise LossShapeError(f"{caller}: {err}") from err
    params = list(model.parameters())
    quantity = _quantity(mc_samples, generator)

    def engine() -> list[Tensor] | None:
        try:
            found = curvature_from_outputs(outputs, term, quantity)
        except LookupError:  # the outputs were not recorded by an extend() context
            return None
        return [torch.zeros_like(p).detach() if found.get(id(p)) is None else found[id(p)] for p in params]

    def autograd() -> list[Tensor]:
        return _from_columns(outputs, term, quantity, params, create_graph)

    result = engine_or_autograd(caller, None if create_graph else engine, autograd)
    if group is None:
        return result
    return sync_results(result, call, outputs.shape[0], group)


def ggn_of_loss(
    model: nn.Module,
    loss_fn: LossFn,
    args: ModelInputs,
    targets: Tensor,
    create_graph: bool,
    mc_samples: int | None,
    generator: torch.Generator | None,
    caller: str,
) -> list[Tensor]:
    """Exact (``mc_samples=None``) or Monte-Carlo GGN diagonal of ``loss_fn(model(*args), targets)``.

    Aligned with ``model.parameters()``.

    Raises:
        UnsupportedLossError: Monte-Carlo for a loss that is not one standard loss call.
    """
    quantity = _quantity(mc_samples, generator)
    params = list(model.parameters())

    def engine() -> list[Tensor]:
        found = run_engine(model, loss_fn, args, targets, params, [quantity]).values[quantity.attribute]
        return [torch.zeros_like(p).detach() if v is None else v for v, p in zip(found, params)]

    def autograd() -> list[Tensor]:
        outputs = args.call(model)
        if not isinstance(outputs, Tensor):
            raise TypeError(f"the model must return one tensor, got {type(outputs).__name__}.")
        with record_loss_calls() as calls:
            loss = check_scalar(loss_fn(outputs, targets), "loss_fn")
        term = _term(loss, calls, outputs, mc_samples is not None)
        return _from_columns(term.edge, term, quantity, params, create_graph)

    return engine_or_autograd(caller, None if create_graph else engine, autograd)


def _quantity(mc_samples: int | None, generator: torch.Generator | None) -> Quantity:
    return DiagGGNExact() if mc_samples is None else DiagGGNMC(mc_samples, generator)


def _term(loss: Tensor, calls: list[LossCall], outputs: Tensor, monte_carlo: bool) -> LossTerm:
    """The term of the call that produced ``loss``, else (exact GGN only) the autograd term at ``outputs``."""
    own = [c for c in calls if c.result is loss]
    if own:
        return loss_term_from_call(own[0])
    if monte_carlo:
        raise UnsupportedLossError(
            "the Monte-Carlo Fisher samples targets from the loss's likelihood, so loss_fn must be one standard "
            "loss (cross-entropy, NLL over log_softmax, MSE, BCE with logits) whose result it returns."
        )
    return AutogradLossTerm(loss.reshape(()), get_gradient_edge(outputs), outputs.shape)


def _from_columns(
    at: Tensor | GradientEdge | None, term: LossTerm, quantity: Quantity, params: list[Tensor], create_graph: bool
) -> list[Tensor]:
    """The GGN diagonal from the term's (exact or sampled) columns backpropagated from ``at`` (``term.edge``)."""
    if isinstance(quantity, DiagGGNMC):
        columns, weights = term.sample_sqrt_hessian(quantity.mc_samples, quantity.generator), None
    else:
        sqrt = term.sqrt_hessian()
        columns, weights = sqrt.columns, sqrt.weights
    active = [i for i, p in enumerate(params) if p.requires_grad]
    result = [torch.zeros_like(p).detach() for p in params]
    if at is None or not active:
        return result
    diag = ggn_diagonal_from_columns(at, [params[i] for i in active], columns, weights, create_graph)
    for i, d in zip(active, diag):
        if d is not None:
            result[i] = d
    return result
