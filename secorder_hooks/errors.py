"""Exception and warning types of :mod:`secorder_hooks`, all in one place.

Every error the package raises on bad input derives from :class:`SecorderError`, so
callers can catch the package's errors without catching unrelated ones. Messages name
the offending module, parameter or argument and say what to do instead. Each type also
derives from the built-in exception a caller would expect (``ValueError`` for a bad
value, ``TypeError`` for a bad type, ``NotImplementedError`` for a valid request the
package cannot compute exactly), so ``except ValueError`` keeps working.
"""

from __future__ import annotations

__all__ = [
    "SecorderError",
    "ExtensionError",
    "UnsupportedModuleError",
    "UnsupportedOperationError",
    "UnsupportedLossError",
    "NonStandardLossError",
    "InvalidChoiceError",
    "UnsupportedLossOptionError",
    "LossInputError",
    "LossDtypeError",
    "LossShapeError",
    "FallbackWarning",
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


class NonStandardLossError(UnsupportedLossError):
    """``loss_fn`` is not one standard loss call, so its reduction factor is unknown."""


class InvalidChoiceError(SecorderError, ValueError):
    """An argument that names one of a fixed set of options (an enum) names none of them.

    Raised by :meth:`secorder_hooks.enums.ChoiceEnum.parse`; the message names the
    argument and lists the accepted values.
    """


class UnsupportedLossOptionError(InvalidChoiceError, UnsupportedLossError):
    """A loss option (``loss_type``, ``reduction``) names no loss the curvature can be computed for.

    Both a ``ValueError`` and a ``NotImplementedError`` (e.g. ``reduction="none"``: a valid
    PyTorch option, but the curvature needs a scalar loss).
    """


class LossInputError(SecorderError, ValueError):
    """The prediction, target or an option passed to a loss is invalid (shape, dtype, value)."""


class LossDtypeError(LossInputError, TypeError):
    """A loss target of a dtype the loss does not accept (e.g. floating class indices)."""


class LossShapeError(UnsupportedLossError, LossInputError):
    """Outputs or targets whose shapes or dtypes the requested likelihood does not support.

    Both a ``NotImplementedError`` (the documented contract of the Fisher functions) and a
    ``ValueError``.
    """


class FallbackWarning(UserWarning):
    """The hook engine could not handle a model or loss; the exact autograd path was used instead.

    The result is exact either way, only slower. Filter it like any warning::

        import warnings
        from secorder_hooks import FallbackWarning

        warnings.filterwarnings("ignore", category=FallbackWarning)
    """
