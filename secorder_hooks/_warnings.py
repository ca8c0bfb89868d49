"""Warnings the package silences on purpose, in one place."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["onednn_disabled", "vmap_fallbacks_allowed"]


@contextmanager
def vmap_fallbacks_allowed() -> Iterator[None]:
    """Silence ``torch.func.vmap``'s "There is a performance drop" warning inside the block.

    A kernel without a batching rule runs once per vector; the result stays exact, and the
    engine has no faster choice there, so the warning would only alarm users.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        yield


@contextmanager
def onednn_disabled() -> Iterator[None]:
    """``torch.backends.mkldnn.flags(enabled=False)`` without torch's notice on setting the flags.

    Entering and leaving the flags context sets oneDNN's TF32 flag too, and CPU builds of
    torch then warn "TF32 acceleration on top of oneDNN is available for Intel GPUs",
    which says nothing about the user's computation.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TF32 acceleration on top of oneDNN", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            yield
