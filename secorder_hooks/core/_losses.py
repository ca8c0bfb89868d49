r"""Seeing which standard loss a user's ``loss_fn`` computes, and its reduction factor.

The function API takes an arbitrary callable ``loss_fn(outputs, targets)``. While it
runs, :func:`record_loss_calls` watches the calls of the standard loss functions
(:data:`~secorder_hooks.losses.calls.LOSS_FUNCTIONS`, which the ``nn`` loss modules
call), checks their targets *before* the loss is evaluated, and keeps each call, from
which :func:`reduction_factor` reads :math:`c` in :math:`L = c \sum_n \ell_n`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses.calls import LOSS_FUNCTIONS, LossCall, LossKind, averaged_terms, make_loss_call

__all__ = [
    "NonStandardLossError",
    "record_loss_calls",
    "check_loss_call",
    "reduction_factor",
    "single_loss_call",
    "the_loss_call",
]

_CATEGORICAL = (LossKind.CROSS_ENTROPY, LossKind.NLL)


class NonStandardLossError(UnsupportedLossError):
    """``loss_fn`` is not one standard loss call, so its reduction factor is unknown."""


class _LossRecorder(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[LossCall] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in LOSS_FUNCTIONS:
            return func(*args, **kwargs)
        call = make_loss_call(func, args, kwargs, result=None)  # type: ignore[arg-type]
        check_loss_call(call)
        call.result = func(*args, **kwargs)
        self.calls.append(call)
        return call.result


@contextmanager
def record_loss_calls() -> Iterator[list[LossCall]]:
    """Record (and check) the standard loss calls made inside the block."""
    recorder = _LossRecorder()
    with recorder:
        yield recorder.calls


def check_loss_call(call: LossCall) -> None:
    """Raise a clear error if the target does not fit the loss and the prediction.

    Raises:
        ValueError: Shapes that PyTorch would broadcast silently or reject later.
        TypeError: A target dtype the loss does not accept.
    """
    x, y, name = call.input, call.target, call.kind.value
    if call.kind in _CATEGORICAL:
        if x.dim() < 2:
            raise ValueError(
                f"{name} loss got a prediction of shape {tuple(x.shape)}; it needs [N, C, ...] (dim 0 indexes "
                "examples, dim 1 classes)."
            )
        if y.is_floating_point() and call.kind is LossKind.CROSS_ENTROPY:
            if y.shape != x.shape:
                raise ValueError(
                    f"cross_entropy with class probabilities needs targets of the prediction's shape "
                    f"{tuple(x.shape)}, got {tuple(y.shape)}."
                )
            return
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"{name} loss needs integer class-index targets (torch.long), got dtype {y.dtype}.")
        expected = (x.shape[0], *x.shape[2:])
        if tuple(y.shape) != expected:
            raise ValueError(
                f"{name} loss with prediction {tuple(x.shape)} needs targets {expected}, got {tuple(y.shape)}."
            )
    else:
        if not y.is_floating_point():
            raise TypeError(f"{name} loss needs floating-point targets, got dtype {y.dtype}.")
        if y.shape != x.shape:
            raise ValueError(
                f"{name} loss got prediction {tuple(x.shape)} and targets {tuple(y.shape)}; the shapes must be equal "
                "(PyTorch would broadcast them, which computes a different loss)."
            )


def reduction_factor(call: LossCall) -> float:
    r""":math:`c` in :math:`L = c \sum_n \ell_n` for one recorded loss call.

    1 for ``reduction="sum"``; for ``"mean"`` one over the number of averaged terms
    (the summed class weights of the non-ignored targets for weighted cross-entropy).

    Raises:
        ValueError: ``reduction="none"`` (the loss is not a scalar).
        ValueError: Every target is ignored, so the mean is undefined.
    """
    reduction = call.options.get("reduction", "mean")
    if reduction == "sum":
        return 1.0
    if reduction != "mean":
        raise ValueError(
            f"loss_fn must reduce to a scalar with reduction 'mean' or 'sum', got reduction={reduction!r}."
        )
    count = averaged_terms(call)
    if count == 0:
        raise ValueError("every target is ignored (ignore_index), so the mean loss and its curvature are undefined.")
    return 1.0 / count


def single_loss_call(loss_fn: Callable[..., Tensor], outputs: Tensor, targets: Tensor) -> tuple[Tensor, LossCall]:
    """Evaluate ``loss_fn(outputs, targets)``, requiring it to be exactly one standard loss call.

    Returns:
        The loss (a scalar) and its recorded call.

    Raises:
        UnsupportedLossError: ``loss_fn`` is not a single standard loss, so the reduction
            factor (and the per-example terms) are unknown.
    """
    with record_loss_calls() as calls:
        loss = loss_fn(outputs, targets)
    return loss, the_loss_call(loss, calls)


def the_loss_call(loss: Tensor, calls: list[LossCall]) -> LossCall:
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
