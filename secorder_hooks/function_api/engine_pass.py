"""One pass of the hook engine on behalf of the function API, without side effects.

The parameters' ``.grad`` and quantity attributes are restored afterwards, and active
``extend()`` contexts of the user are suspended during the pass, so calling a function
of the API never changes the model's state, inside a context or not. The engine's own
torch-function mode sees the loss calls (:mod:`secorder_hooks.losses.recognition`): the
:func:`~secorder_hooks.losses.recognition.record_loss_calls` block below checks their
targets and keeps them without a second mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from secorder_hooks.engine import extend
from secorder_hooks.engine.accumulate import WINDOW_ATTRIBUTE, clear_quantities, quantity_attributes
from secorder_hooks.engine.session import isolated
from secorder_hooks.function_api.validation import ModelInputs, check_scalar
from secorder_hooks.losses.base import LossCall
from secorder_hooks.losses.recognition import record_loss_calls
from secorder_hooks.quantities import Quantity

__all__ = ["EngineResult", "run_engine"]


@dataclass
class EngineResult:
    """What one engine pass computed.

    Attributes:
        values: Per quantity attribute, the value for each parameter (aligned with the
            ``params`` passed to :func:`run_engine`; ``None`` where none was written).
        loss: The loss (detached from the freed graph's use: for identity checks only).
        loss_calls: The standard loss calls ``loss_fn`` made.
    """

    values: dict[str, list[Tensor | None]]
    loss: Tensor
    loss_calls: list[LossCall]


def run_engine(
    model: nn.Module,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    args: ModelInputs,
    targets: Tensor,
    params: Sequence[Tensor],
    quantities: Sequence[Quantity],
    check: Callable[[Tensor, list[LossCall]], object] | None = None,
) -> EngineResult:
    """Forward, loss and backward inside :func:`~secorder_hooks.extend` with ``quantities``.

    ``check(loss, loss_calls)``, if given, runs before the backward pass.

    Raises:
        Whatever the engine raises (``NotImplementedError`` subclasses and
        :class:`~secorder_hooks.ExtensionError` when it declines the model or loss).
    """
    touched = list({id(p): p for p in (*params, *model.parameters())}.values())
    saved = [(p.grad, _quantity_state(p)) for p in touched]
    attributes = [q.attribute for q in quantities]
    try:
        for p in touched:
            p.grad = None
        with isolated(), extend(model, *quantities):
            outputs = args.call(model)
            with record_loss_calls() as calls:
                loss = check_scalar(loss_fn(outputs, targets), "loss_fn")
            if check is not None:
                check(loss, calls)
            loss.backward()
        values = {a: [getattr(p, a, None) for p in params] for a in attributes}
    finally:
        clear_quantities(touched)
        for p, (grad, state) in zip(touched, saved):
            p.grad = grad
            p.__dict__.update(state)
    return EngineResult(values=values, loss=loss, loss_calls=calls)


def _quantity_state(p: Tensor) -> dict[str, object]:
    """The quantity attributes of ``p`` and what they accumulated (restored after the pass)."""
    names = {*quantity_attributes(), WINDOW_ATTRIBUTE}
    return {k: v for k, v in p.__dict__.items() if k in names}
