"""secorder_hooks: per-example gradients and curvature diagonals in one backward pass."""

from secorder_hooks import rules  # noqa: F401  (registers the built-in rules)
from secorder_hooks.approximations import (
    empirical_fisher_diagonal,
    empirical_fisher_trace,
    generalized_fisher_diagonal,
    generalized_fisher_trace,
)
from secorder_hooks.core import (
    FallbackWarning,
    get_layer_curvature_stats,
    hessian_diagonal,
    model_hessian_diagonal,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)
from secorder_hooks.engine import clear_quantities, extend
from secorder_hooks.errors import (
    ExtensionError,
    SecorderError,
    UnsupportedLossError,
    UnsupportedModuleError,
    UnsupportedOperationError,
)
from secorder_hooks.quantities import (
    EKFAC,
    KFAC,
    KFLR,
    Accumulation,
    BatchDiagGGNExact,
    BatchDiagHessian,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    KFACEmpirical,
    KroneckerQuantity,
    KronFallback,
    Quantity,
    SumGradSquared,
    Variance,
    WeightSharing,
)
from secorder_hooks.rules import LayerRule, register_rule
from secorder_hooks.rules.check import check_rule

__version__ = "0.1.0"

__all__ = [
    "hessian_diagonal",
    "model_hessian_diagonal",
    "per_layer_hessian_diagonal",
    "per_layer_fisher_diagonal",
    "get_layer_curvature_stats",
    "empirical_fisher_diagonal",
    "generalized_fisher_diagonal",
    "empirical_fisher_trace",
    "generalized_fisher_trace",
    "FallbackWarning",
    "extend",
    "clear_quantities",
    "register_rule",
    "check_rule",
    "LayerRule",
    "Quantity",
    "Accumulation",
    "BatchGrad",
    "SumGradSquared",
    "BatchL2Grad",
    "Variance",
    "DiagGGNExact",
    "BatchDiagGGNExact",
    "DiagGGNMC",
    "DiagHessian",
    "BatchDiagHessian",
    "KFLR",
    "KFAC",
    "KFACEmpirical",
    "EKFAC",
    "KroneckerQuantity",
    "WeightSharing",
    "KronFallback",
    "SecorderError",
    "ExtensionError",
    "UnsupportedModuleError",
    "UnsupportedOperationError",
    "UnsupportedLossError",
]
