"""Exception types raised by :mod:`secorder_hooks`.

Every error the package raises on bad input derives from :class:`SecorderError`, so
callers can catch the package's errors without catching unrelated ones. Messages name
the offending module, parameter or argument and say what to do instead.
"""

from __future__ import annotations

__all__ = [
    "SecorderError",
    "ExtensionError",
    "UnsupportedModuleError",
    "UnsupportedOperationError",
    "UnsupportedLossError",
]


class SecorderError(Exception):
    """Base class of every error raised by :mod:`secorder_hooks`."""


class ExtensionError(SecorderError, RuntimeError):
    """The model or the way it is used inside :func:`secorder_hooks.extend` is invalid.

    Examples: a model without trainable parameters, a backward pass whose graph was
    built outside the context, a parameter used outside the module that owns it.
    """


class UnsupportedModuleError(SecorderError, NotImplementedError):
    """A module's per-example quantities are undefined or cannot be computed exactly.

    Example: ``nn.BatchNorm2d`` in training mode mixes the examples of a batch.
    """


class UnsupportedOperationError(SecorderError, NotImplementedError):
    """An operation of the autograd graph has a second-order term the engine cannot add.

    Raised instead of silently returning an inexact Hessian diagonal.
    """


class UnsupportedLossError(SecorderError, NotImplementedError):
    """The loss cannot be decomposed as required by the requested quantity.

    Example: Monte-Carlo sampling for a loss without a known likelihood.
    """
