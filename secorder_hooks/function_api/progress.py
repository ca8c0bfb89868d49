"""A minimal progress bar: :mod:`tqdm` when installed, otherwise one line on stderr."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["progress_bar"]


class _LineProgress:
    def __init__(self, total: int, desc: str) -> None:
        self.total, self.done, self.desc = total, 0, desc

    def update(self, k: int) -> None:
        self.done += k
        sys.stderr.write(f"\r{self.desc}: {self.done}/{self.total}")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")


class _NoProgress:
    def update(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, desc: str) -> Any:
    """An object with ``update(k)`` and ``close()``; silent unless ``enabled``."""
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _LineProgress(total, desc)
    return tqdm(total=total, desc=desc)
