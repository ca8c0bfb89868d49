"""Exact Hessian diagonals and per-layer curvature: the model-level function API."""

from secorder_hooks.core._fallback import Backend, FallbackWarning, use_backend
from secorder_hooks.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from secorder_hooks.core.per_layer_curvature import (
    FisherType,
    get_layer_curvature_stats,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)

__all__ = [
    "hessian_diagonal",
    "model_hessian_diagonal",
    "per_layer_hessian_diagonal",
    "per_layer_fisher_diagonal",
    "get_layer_curvature_stats",
    "FisherType",
    "FallbackWarning",
    "Backend",
    "use_backend",
]
