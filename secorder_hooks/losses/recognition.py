r"""Seeing the standard loss calls a block of code makes, checking their targets first.

Loss calls are seen by exactly one torch-function mode: the engine's while an
:func:`~secorder_hooks.extend` context watches them, otherwise the small mode that
:func:`record_loss_calls` pushes. Either hands every call of a function of
:data:`~secorder_hooks.losses.calls.LOSS_FUNCTIONS` to :func:`call_loss`, which parses it
once, checks its targets *before* the loss runs when a :func:`record_loss_calls` block
asks for it (the function API: a clear package error instead of PyTorch's silent
broadcasting or a later failure), runs it and appends it to every open block's list. A
mode that sees loss calls derives from :class:`LossWatchingMode`, so that a block opened
under it adds no second mode (and no second parse).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from secorder_hooks.errors import NonStandardLossError
from secorder_hooks.losses.base import LossCall
from secorder_hooks.losses.calls import LOSS_FUNCTIONS, make_loss_call

__all__ = ["LossWatchingMode", "call_loss", "record_loss_calls", "single_loss_call", "the_loss_call"]

_BLOCKS: ContextVar[tuple[list[LossCall], ...]] = ContextVar("secorder_hooks_loss_blocks", default=())
"""The lists of the open :func:`record_loss_calls` blocks, innermost last."""


class LossWatchingMode(TorchFunctionMode):
    """A torch-function mode that hands every loss call to :func:`call_loss` while :meth:`watches_losses`."""

    def watches_losses(self) -> bool:
        """Whether the mode currently hands loss calls to :func:`call_loss`."""
        return True


def call_loss(func: Callable[..., Tensor], args: tuple, kwargs: dict) -> LossCall:
    """Run a call of one of :data:`~secorder_hooks.losses.calls.LOSS_FUNCTIONS`, parsed once.

    Inside :func:`record_loss_calls` blocks the targets are checked first and the call is
    appended to each block's list; otherwise the call runs first, so that its own errors
    reach the caller unchanged.

    Returns:
        The call, its :attr:`~secorder_hooks.losses.base.LossCall.result` set.

    Raises:
        LossInputError: (inside a block) Targets that do not fit the prediction.
    """
    blocks = _BLOCKS.get()
    if not blocks:
        result = func(*args, **kwargs)
        return make_loss_call(func, args, kwargs, result)
    try:
        call = make_loss_call(func, args, kwargs, None)
    except TypeError:  # arguments the function does not take: its own error says which
        func(*args, **kwargs)
        raise
    call.loss.check_targets(call)
    call.result = func(*args, **kwargs)
    for calls in blocks:
        calls.append(call)
    return call


class _RecordingMode(LossWatchingMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in LOSS_FUNCTIONS:
            return call_loss(func, args, kwargs).result
        return func(*args, **kwargs)


@contextmanager
def record_loss_calls() -> Iterator[list[LossCall]]:
    """Record (and check the targets of) the standard loss calls made inside the block.

    Yields:
        The list the block's calls are appended to, in order.
    """
    calls: list[LossCall] = []
    token = _BLOCKS.set((*_BLOCKS.get(), calls))
    try:
        stack = torch.overrides._get_current_function_mode_stack()
        if any(isinstance(mode, LossWatchingMode) and mode.watches_losses() for mode in stack):
            yield calls
        else:
            with _RecordingMode():
                yield calls
    finally:
        _BLOCKS.reset(token)


def the_loss_call(loss: Tensor, calls: Sequence[LossCall]) -> LossCall:
    """The one recorded call whose result is ``loss``.

    Raises:
        NonStandardLossError: There is no such call, or there are several loss calls.
    """
    if len(calls) != 1 or calls[0].result is not loss:
        raise NonStandardLossError(
            "the empirical Fisher needs the reduction factor of the loss, so loss_fn must be one standard loss "
            "(nn.CrossEntropyLoss, nn.NLLLoss, nn.MSELoss, nn.BCEWithLogitsLoss or their functional forms) whose "
            f"result it returns; it made {len(calls)} such call(s)."
        )
    return calls[0]


def single_loss_call(loss_fn: Callable[..., Tensor], outputs: Tensor, targets: Tensor) -> tuple[Tensor, LossCall]:
    """Evaluate ``loss_fn(outputs, targets)``, requiring it to be exactly one standard loss call.

    Returns:
        The loss and its recorded call.

    Raises:
        NonStandardLossError: ``loss_fn`` is not a single standard loss, so the reduction
            factor (and the per-example terms) are unknown.
    """
    with record_loss_calls() as calls:
        loss = loss_fn(outputs, targets)
    return loss, the_loss_call(loss, calls)
