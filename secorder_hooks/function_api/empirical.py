r"""The empirical Fisher :math:`c \sum_n \nabla \ell_n \nabla \ell_n^\top`: its diagonal and trace.

Engine path: one backward with :class:`~secorder_hooks.SumGradSquared` (diagonal) or
:class:`~secorder_hooks.BatchL2Grad` (trace; Linear layers give the norms as
:math:`\|g_n\|^2 \|x_n\|^2` without per-example gradients), divided by :math:`c`.
Autograd path: per-example gradients by batched vector-Jacobian products.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from secorder_hooks.engine.sync import SyncOption
from secorder_hooks.errors import NonStandardLossError
from secorder_hooks.function_api.backend import engine_or_autograd
from secorder_hooks.function_api.engine_pass import run_engine
from secorder_hooks.function_api.sync import synchronized
from secorder_hooks.function_api.validation import Inputs, ModelInputs, check_batch, check_scalar, zeros_like_all
from secorder_hooks.function_api.vector_products import per_example_gradients
from secorder_hooks.losses.calls import reduction_factor
from secorder_hooks.losses.recognition import single_loss_call, the_loss_call
from secorder_hooks.quantities import BatchL2Grad, SumGradSquared

__all__ = ["LossFn", "empirical_fisher"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def empirical_fisher(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    *,
    trace: bool,
    create_graph: bool = False,
    caller: str = "empirical_fisher_diagonal",
    sync: SyncOption = None,
) -> list[Tensor] | Tensor:
    """Diagonal (aligned with ``model.parameters()``) or trace (0-dim) of the empirical Fisher.

    ``sync`` as for :func:`~secorder_hooks.core.hessian_diagonal.model_hessian_diagonal` (global batch).
    """

    def compute(model: nn.Module, loss_fn: LossFn) -> list[Tensor] | Tensor:
        args = check_batch(model, inputs, targets)
        params = list(model.parameters())
        return engine_or_autograd(
            caller,
            None if create_graph else lambda: _engine(model, loss_fn, args, targets, params, trace),
            lambda: _autograd(model, loss_fn, args, targets, params, trace, create_graph),
            propagate=(NonStandardLossError,),
        )

    return synchronized(caller, model, loss_fn, sync, compute, create_graph)


def _engine(
    model: nn.Module, loss_fn: LossFn, args: ModelInputs, targets: Tensor, params: list[Tensor], trace: bool
) -> list[Tensor] | Tensor:
    quantity = BatchL2Grad() if trace else SumGradSquared()
    result = run_engine(model, loss_fn, args, targets, params, [quantity], check=the_loss_call)
    c = reduction_factor(the_loss_call(result.loss, result.loss_calls))
    values = result.values[quantity.attribute]
    if trace:
        total = sum((v.sum() for v in values if v is not None), result.loss.new_zeros(()).detach())
        return total / c
    return [torch.zeros_like(p).detach() if v is None else v / c for v, p in zip(values, params)]


def _autograd(
    model: nn.Module,
    loss_fn: LossFn,
    args: ModelInputs,
    targets: Tensor,
    params: list[Tensor],
    trace: bool,
    create_graph: bool,
) -> list[Tensor] | Tensor:
    outputs = args.call(model)
    if not isinstance(outputs, Tensor):
        raise TypeError(f"the model must return one tensor, got {type(outputs).__name__}.")
    loss, call = single_loss_call(loss_fn, outputs, targets)
    check_scalar(loss, "loss_fn")
    c = reduction_factor(call)
    active = [i for i, p in enumerate(params) if p.requires_grad]
    sums: list[Tensor] = zeros_like_all(params)
    if active and loss.requires_grad:
        for _, grads in per_example_gradients(outputs, loss, [params[i] for i in active], create_graph):
            for i, g in zip(active, grads):
                if g is not None:
                    sums[i] = sums[i] + (g**2).sum(0)
    if trace:
        return sum((s.sum() for s in sums), loss.new_zeros(()).detach()) / c
    return [s / c for s in sums]
