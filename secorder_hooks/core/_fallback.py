"""Choosing between the hook engine and the generic autograd path of the function API.

Every function of :mod:`secorder_hooks.core` and :mod:`secorder_hooks.approximations`
computes an exact result. It uses the hook engine (:func:`secorder_hooks.extend`, one
backward pass) where the engine supports the model and loss, and otherwise an exact
generic path built on vectorized autograd products. When the engine declines a
problem it could have been asked to solve, a :class:`FallbackWarning` says so; the
result is exact either way, only slower. Filter it like any warning::

    import warnings
    from secorder_hooks import FallbackWarning

    warnings.filterwarnings("ignore", category=FallbackWarning)

The path taken is also logged at ``DEBUG`` level on the ``secorder_hooks`` logger.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from secorder_hooks.errors import ExtensionError

__all__ = ["Backend", "FallbackWarning", "ENGINE_ERRORS", "use_backend", "current_backend", "engine_supports"]

logger = logging.getLogger("secorder_hooks")

ENGINE_ERRORS: tuple[type[BaseException], ...] = (NotImplementedError, ExtensionError)
"""Errors of the engine after which the function API falls back to the generic path."""


class FallbackWarning(UserWarning):
    """The hook engine could not handle a model or loss; the exact generic path was used instead."""


class Backend(enum.Enum):
    """Which implementation the function API uses."""

    AUTO = "auto"
    """The engine where it applies, the generic path otherwise (with a :class:`FallbackWarning`)."""
    ENGINE = "engine"
    """Always the engine; its errors propagate (for tests and benchmarks)."""
    GENERIC = "generic"
    """Always the generic autograd path."""


_backend = Backend.AUTO


def current_backend() -> Backend:
    """The backend selected by the innermost :func:`use_backend` block (default :attr:`Backend.AUTO`)."""
    return _backend


@contextmanager
def use_backend(backend: Backend | str) -> Iterator[None]:
    """Select the backend of the function API inside a ``with`` block (not thread-safe).

    Args:
        backend: A :class:`Backend` or its value (``"auto"``, ``"engine"``, ``"generic"``).
    """
    global _backend
    previous, _backend = _backend, Backend(backend)
    try:
        yield
    finally:
        _backend = previous


def engine_supports(second_order: bool) -> bool:
    """Whether the engine is asked first under the current backend.

    Args:
        second_order: Whether the request needs curvature quantities; engines built without
            the curvature passes are skipped for them.
    """
    if _backend is Backend.GENERIC:
        return False
    if _backend is Backend.ENGINE or not second_order:
        return True
    return _has_curvature_passes()


def _has_curvature_passes() -> bool:
    from secorder_hooks.engine import curvature

    return callable(getattr(getattr(curvature, "CurvaturePlan", None), "build", None))
