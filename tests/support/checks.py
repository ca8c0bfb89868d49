"""Assertions and probes shared by the tests: closeness of tensor lists, hooks left on a
model, tensors left alive."""

from __future__ import annotations

import gc
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["HOOK_DICTS", "assert_all_close", "hook_counts", "live_tensors"]

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
)
"""The hook dictionaries of an ``nn.Module``."""


def assert_all_close(
    actual: Sequence[Tensor], expected: Sequence[Tensor], rtol: float = 1e-9, atol: float = 1e-12
) -> None:
    """Same length, same shapes, and each pair close (``expected`` cast to the dtype of ``actual``)."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        torch.testing.assert_close(a, e.to(a.dtype), rtol=rtol, atol=atol)


def hook_counts(model: nn.Module) -> list[tuple[str, str, int]]:
    """``(module name, hook dictionary, number of hooks)`` for every module of ``model``."""
    return [(name, d, len(getattr(m, d))) for name, m in model.named_modules() for d in HOOK_DICTS if hasattr(m, d)]


def live_tensors() -> int:
    """Number of tensors (parameters included) alive after a garbage collection."""
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, Tensor))
