"""The backend policy of the function API: the hook engine, else exact vectorized autograd.

Every function of ``secorder_hooks.core`` and ``secorder_hooks.approximations``
computes an exact result. It uses the hook engine (:func:`secorder_hooks.extend`, one
backward pass) where the engine supports the model and loss, and otherwise an exact
path built on vectorized autograd products (``function_api.vector_products``,
:func:`~secorder_hooks.core.hessian_diagonal.hessian_diagonal`). :func:`engine_or_autograd`
is the one place that chooses. When the engine declines a problem it was asked to solve,
a :class:`~secorder_hooks.FallbackWarning` says so; the result is exact either way, only
slower. Filter it like any warning::

    import warnings
    from secorder_hooks import FallbackWarning

    warnings.filterwarnings("ignore", category=FallbackWarning)

The path taken is also logged at ``DEBUG`` level on the ``secorder_hooks`` logger.
:func:`use_backend` forces one path (for tests and benchmarks).
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from secorder_hooks.enums import ChoiceEnum
from secorder_hooks.errors import ExtensionError, FallbackWarning

__all__ = ["Backend", "ENGINE_ERRORS", "use_backend", "current_backend", "engine_or_autograd"]

logger = logging.getLogger("secorder_hooks")

_T = TypeVar("_T")

ENGINE_ERRORS: tuple[type[BaseException], ...] = (NotImplementedError, ExtensionError)
"""Errors of the engine after which the function API takes the autograd path."""


class Backend(ChoiceEnum):
    """Which implementation the function API uses."""

    AUTO = "auto"
    """The engine where it applies, vectorized autograd otherwise (with a :class:`~secorder_hooks.FallbackWarning`)."""
    ENGINE = "engine"
    """Always the engine; its errors propagate (for tests and benchmarks)."""
    GENERIC = "generic"
    """Always the exact vectorized-autograd path, which needs no rule for any layer."""


_backend = Backend.AUTO


def current_backend() -> Backend:
    """The backend selected by the innermost :func:`use_backend` block (default :attr:`Backend.AUTO`)."""
    return _backend


@contextmanager
def use_backend(backend: Backend | str) -> Iterator[None]:
    """Select the backend of the function API inside a ``with`` block (not thread-safe).

    Args:
        backend: A :class:`Backend` or its value (``"auto"``, ``"engine"``, ``"generic"``).

    Raises:
        InvalidChoiceError: Another value.
    """
    global _backend
    previous, _backend = _backend, Backend.parse(backend, "backend")
    try:
        yield
    finally:
        _backend = previous


def engine_or_autograd(
    caller: str,
    engine: Callable[[], _T | None] | None,
    autograd: Callable[[], _T],
    *,
    propagate: tuple[type[BaseException], ...] = (),
    advice: str = "",
) -> _T:
    """The result of ``engine()`` where the backend and the engine allow it, else of ``autograd()``.

    Args:
        caller: The public function, for the warning and the log.
        engine: The engine path, or ``None`` where it does not apply (e.g. ``create_graph=True``).
            Returning ``None`` also means "not applicable": the autograd path runs, without a warning.
        autograd: The exact autograd path.
        propagate: Errors of the engine that are the user's and must not trigger the fallback.
        advice: Appended to the warning (e.g. what the autograd path costs).

    Raises:
        Whatever ``engine()`` raises under :attr:`Backend.ENGINE`, errors in ``propagate``
        and those outside :data:`ENGINE_ERRORS`.
    """
    if engine is not None and _backend is not Backend.GENERIC:
        try:
            result = engine()
        except propagate:
            raise
        except ENGINE_ERRORS as err:
            if _backend is Backend.ENGINE:
                raise
            warnings.warn(
                FallbackWarning(
                    f"{caller}: the engine declined ({type(err).__name__}: {err}); using the exact generic "
                    f"path{advice}."
                ),
                stacklevel=_user_stacklevel(),
            )
        else:
            if result is not None:
                logger.debug("%s: engine path", caller)
                return result
    logger.debug("%s: generic path", caller)
    return autograd()


def _user_stacklevel() -> int:
    """``stacklevel`` for :func:`warnings.warn` that points at the first frame outside the package."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("secorder_hooks"):
        frame, level = frame.f_back, level + 1
    return level
