"""secorder_hooks: per-example gradients and curvature diagonals in one backward pass."""

from secorder_hooks import rules  # noqa: F401  (registers the built-in rules)
from secorder_hooks.engine import extend
from secorder_hooks.errors import (
    ExtensionError,
    SecorderError,
    UnsupportedLossError,
    UnsupportedModuleError,
    UnsupportedOperationError,
)
from secorder_hooks.quantities import (
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    Quantity,
    SumGradSquared,
    Variance,
)
from secorder_hooks.rules import LayerRule, register_rule

__version__ = "0.1.0"

__all__ = [
    "extend",
    "register_rule",
    "LayerRule",
    "Quantity",
    "BatchGrad",
    "SumGradSquared",
    "BatchL2Grad",
    "Variance",
    "DiagGGNExact",
    "BatchDiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
    "SecorderError",
    "ExtensionError",
    "UnsupportedModuleError",
    "UnsupportedOperationError",
    "UnsupportedLossError",
]
