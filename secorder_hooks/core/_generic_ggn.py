r"""The generic GGN path for a model and an arbitrary ``loss_fn`` (no engine).

The loss term comes from the one standard loss call that produced the loss (closed
form, with sampling for the Monte-Carlo Fisher), or, for any other loss summing over
examples, from autograd (Hessian blocks at the model output, exact GGN only).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from secorder_hooks.approximations._generic import ggn_diagonal_from_columns
from secorder_hooks.core._losses import record_loss_calls
from secorder_hooks.core._validation import ModelInputs, check_scalar
from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses.autograd import AutogradLossTerm
from secorder_hooks.losses.base import LossTerm
from secorder_hooks.losses.factory import loss_term_from_call
from secorder_hooks.quantities import DiagGGNMC, Quantity

__all__ = ["generic_ggn_for_loss"]


def generic_ggn_for_loss(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    args: ModelInputs,
    targets: Tensor,
    params: list[Tensor],
    create_graph: bool,
    monte_carlo: bool,
    quantity: Quantity,
) -> list[Tensor]:
    """Exact (or Monte-Carlo) GGN diagonal, aligned with ``params``."""
    outputs = args.call(model)
    if not isinstance(outputs, Tensor):
        raise TypeError(f"the model must return one tensor, got {type(outputs).__name__}.")
    with record_loss_calls() as calls:
        loss = check_scalar(loss_fn(outputs, targets), "loss_fn")
    term = _term(loss, calls, outputs, monte_carlo)
    if isinstance(quantity, DiagGGNMC):
        columns, weights = term.sample_sqrt_hessian(quantity.mc_samples, quantity.generator), None
    else:
        sqrt = term.sqrt_hessian()
        columns, weights = sqrt.columns, sqrt.weights
    active = [i for i, p in enumerate(params) if p.requires_grad]
    result = [torch.zeros_like(p).detach() for p in params]
    if term.edge is None or not active:
        return result
    diag = ggn_diagonal_from_columns(term.edge, [params[i] for i in active], columns, weights, create_graph)
    for i, d in zip(active, diag):
        if d is not None:
            result[i] = d
    return result


def _term(loss: Tensor, calls: list, outputs: Tensor, monte_carlo: bool) -> LossTerm:
    own = [c for c in calls if c.result is loss]
    if own:
        return loss_term_from_call(own[0])
    if monte_carlo:
        raise UnsupportedLossError(
            "the Monte-Carlo Fisher samples targets from the loss's likelihood, so loss_fn must be one standard "
            "loss (cross-entropy, NLL over log_softmax, MSE, BCE with logits) whose result it returns."
        )
    return AutogradLossTerm(loss.reshape(()), get_gradient_edge(outputs), outputs.shape)
