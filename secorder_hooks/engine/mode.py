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
from torch.overrides import TorchFunctionMode

from secorder_hooks.engine.backward import autograd_backward, tensor_backward
from secorder_hooks.engine.broadcast import BROADCASTING, expand_watched
from secorder_hooks.engine.session import Session
from secorder_hooks.losses.calls import LOSS_FUNCTIONS, make_loss_call

__all__ = ["EngineMode"]


class EngineMode(TorchFunctionMode):
    """Intercepts ``Tensor.backward``, ``torch.autograd.backward``, loss functions and parameter uses for a session."""

    def __init__(self, session: Session) -> None:
        super().__init__()
        self.session = session

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.session.suspended:
            return func(*args, **kwargs)
        if func is Tensor.backward:
            return tensor_backward(self.session, *args, **kwargs)
        if func is torch.autograd.backward:
            return autograd_backward(self.session, *args, **kwargs)
        session = self.session
        if func in BROADCASTING and session.watched and not session.records.paused:
            args, kwargs = expand_watched(session.watched, session.records, func, args, kwargs)
        result = func(*args, **kwargs)  # the operation itself: its errors reach the caller unchanged
        if func in LOSS_FUNCTIONS:
            if isinstance(result, Tensor) and result.grad_fn is not None:  # not under no_grad(): no backward follows
                self.session.add_loss_call(make_loss_call(func, args, kwargs, result))
        elif torch.is_grad_enabled():
            # composite functions may return several tensors (e.g. F.multi_head_attention_forward)
            for out in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(out, Tensor) and out.requires_grad:
                    self.session.check_parameter_use(args, kwargs, out)
        return result
