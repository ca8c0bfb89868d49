"""Exact Hessian diagonals and per-layer curvature: the model-level function API (public modules)."""

from secorder_hooks.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal
from secorder_hooks.core.per_layer_curvature import (
    FisherType,
    get_layer_curvature_stats,
    per_layer_fisher_diagonal,
    per_layer_hessian_diagonal,
)
from secorder_hooks.errors import FallbackWarning
from secorder_hooks.function_api.backend import Backend, use_backend

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
