"""Checks of the function API's arguments, run before any backward pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "Inputs",
    "ModelInputs",
    "as_model_inputs",
    "check_batch",
    "check_params",
    "check_vectors",
    "check_scalar",
]

Inputs = Union[Tensor, Sequence[Tensor], Mapping[str, Any]]
"""What the function API takes as ``inputs``: a tensor, a tuple of positional arguments or a
dict of keyword arguments (``{"input_ids": ..., "attention_mask": ...}`` for a Hugging Face model)."""


@dataclass(frozen=True)
class ModelInputs:
    """The arguments of the model call: ``model(*args, **kwargs)``.

    Attributes:
        args: Positional arguments.
        kwargs: Keyword arguments.
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def call(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    @property
    def first(self) -> Tensor:
        """The first tensor argument (positional, else keyword); dim 0 indexes the examples."""
        return next(x for x in (*self.args, *self.kwargs.values()) if isinstance(x, Tensor))


def as_model_inputs(inputs: Inputs) -> ModelInputs:
    """``inputs`` as the arguments of the model call."""
    if isinstance(inputs, Tensor):
        return ModelInputs((inputs,), {})
    if isinstance(inputs, (tuple, list)) and inputs and all(isinstance(x, Tensor) for x in inputs):
        return ModelInputs(tuple(inputs), {})
    if (
        isinstance(inputs, Mapping)
        and all(isinstance(k, str) for k in inputs)
        and any(isinstance(x, Tensor) for x in inputs.values())
    ):
        return ModelInputs((), dict(inputs))
    raise TypeError(
        "inputs must be a tensor, a non-empty tuple of tensors (positional arguments) or a dict of keyword "
        f"arguments with at least one tensor, got {type(inputs).__name__}."
    )


def check_batch(model: nn.Module, inputs: Inputs, targets: Tensor) -> ModelInputs:
    """Check that ``model`` is a module, that ``inputs`` hold ``N >= 1`` examples and that ``targets`` is a tensor.

    ``targets`` may have any shape (``loss_fn`` pairs it with the output), e.g. ``[N]``
    class labels, ``[N, T]`` token labels or ``[N * T]`` labels of flattened logits.

    Returns:
        The arguments of the model call.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}.")
    call = as_model_inputs(inputs)
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets must be a tensor, got {type(targets).__name__}.")
    first = call.first
    n = first.shape[0] if first.dim() > 0 else None
    if n is None:
        raise ValueError("inputs must have a batch dimension (dim 0 indexes the examples); got a 0-dim tensor.")
    if n == 0:
        raise ValueError("inputs hold an empty batch (dim 0 has size 0); pass at least one example.")
    return call


def check_params(params: Sequence[Tensor], strict: bool) -> list[Tensor]:
    """Check that ``params`` is a sequence of leaf tensors (with ``strict``, all requiring grad)."""
    if isinstance(params, Tensor):
        params = [params]
    params = list(params)
    if not params:
        raise ValueError("params is empty; pass the tensors whose Hessian diagonal you want.")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, not a tensor.")
        if not p.is_leaf:
            raise ValueError(
                f"params[{i}] is not a leaf tensor (it was computed from other tensors); pass the leaf tensors "
                "(e.g. model parameters, or tensors created with requires_grad=True) instead."
            )
        if strict and not p.requires_grad:
            raise ValueError(f"params[{i}] does not require grad (strict=True); set requires_grad or use strict=False.")
    return params


def check_vectors(v: Sequence[Tensor] | None, params: Sequence[Tensor]) -> list[Tensor] | None:
    """Check that ``v`` matches ``params`` in length and shapes."""
    if v is None:
        return None
    if isinstance(v, Tensor):
        v = [v]
    v = list(v)
    if len(v) != len(params):
        raise ValueError(f"v has {len(v)} tensors but params has {len(params)}; pass one tensor per parameter.")
    for i, (vi, p) in enumerate(zip(v, params)):
        if not isinstance(vi, Tensor) or vi.shape != p.shape:
            shape = tuple(vi.shape) if isinstance(vi, Tensor) else type(vi).__name__
            raise ValueError(f"v[{i}] has shape {shape} but params[{i}] has shape {tuple(p.shape)}.")
    return v


def check_scalar(value: object, what: str) -> Tensor:
    """Check that ``value`` is a tensor with one element; return it unchanged."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} must return a tensor, got {type(value).__name__}.")
    if value.numel() != 1:
        raise ValueError(
            f"{what} must return a scalar (one element), got shape {tuple(value.shape)}; reduce it, "
            "e.g. with .sum() or reduction='mean'."
        )
    return value


def zeros_like_all(params: Sequence[Tensor]) -> list[Tensor]:
    """Zero tensors of the parameters' shapes (detached)."""
    return [torch.zeros_like(p, memory_format=torch.contiguous_format).detach() for p in params]
