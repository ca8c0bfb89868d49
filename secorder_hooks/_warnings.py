"""Warnings the package silences on purpose, in one place."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["vmap_fallbacks_allowed"]


@contextmanager
def vmap_fallbacks_allowed() -> Iterator[None]:
    """Silence ``torch.func.vmap``'s "There is a performance drop" warning inside the block.

    A kernel without a batching rule runs once per vector; the result stays exact, and the
    engine has no faster choice there, so the warning would only alarm users.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop", UserWarning)
        yield
