"""The torch-function mode through which the engine sees the forward and the backward.

While an :func:`~secorder_hooks.extend` context is active, :class:`EngineMode` is pushed
as a :class:`torch.overrides.TorchFunctionMode`. It

* routes ``Tensor.backward`` and ``torch.autograd.backward`` to the engine, so a plain
  ``loss.backward()`` computes the requested quantities (``torch.autograd.grad`` passes
  through: it computes ordinary gradients only and leaves the records in place),
* records every call of a standard loss function (:mod:`secorder_hooks.losses.calls`),
* notes any trainable parameter that enters a differentiable operation while none of
  the modules owning it is executing (weights used outside their module, penalty terms),
  which per-example rules cannot see,
* expands outputs of calls without the batch on dim 0 where they are broadcast over the
  examples (``secorder_hooks.engine.broadcast``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from secorder_hooks.engine.backward import autograd_backward, tensor_backward
from secorder_hooks.engine.broadcast import BROADCASTING, expand_watched
from secorder_hooks.engine.session import Session
from secorder_hooks.losses.calls import LOSS_FUNCTIONS
from secorder_hooks.losses.recognition import LossWatchingMode, call_loss

__all__ = ["EngineMode"]


class EngineMode(LossWatchingMode):
    """Intercepts ``Tensor.backward``, ``torch.autograd.backward``, loss functions and parameter uses for a session."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def watches_losses(self) -> bool:
        """Whether the session is not suspended (:func:`~secorder_hooks.engine.session.isolated`)."""
        return not self.session.suspended

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        # Runs for every torch call while the context is active (tensor attribute reads included):
        # the common case, an operation without a watched output or a parameter of the session among
        # its arguments, is a few set lookups and one scan of the arguments.
        session = self.session
        if kwargs is None:
            kwargs = {}
        if session.suspended:
            return func(*args, **kwargs)
        if func is Tensor.backward:
            return tensor_backward(session, *args, **kwargs)
        if func is torch.autograd.backward:
            return autograd_backward(session, *args, **kwargs)
        if func in LOSS_FUNCTIONS:  # parsed once, by the loss layer (which checks targets for the function API)
            call = call_loss(func, args, kwargs)
            if isinstance(call.result, Tensor) and call.result.grad_fn is not None:  # else no backward follows
                session.add_loss_call(call)
            return call.result
        if func in BROADCASTING and session.watched and not session.records.paused:
            args, kwargs = expand_watched(session.watched, session.records, func, args, kwargs)
        result = func(*args, **kwargs)  # the operation itself: its errors reach the caller unchanged
        if torch.is_grad_enabled():
            session.check_parameter_use(args, kwargs, result)
        return result
