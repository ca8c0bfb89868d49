"""Diagonals and traces of Fisher information matrices (empirical and generalized)."""

from secorder_hooks.approximations.fisher_diagonal import empirical_fisher_diagonal, generalized_fisher_diagonal
from secorder_hooks.approximations.fisher_trace import empirical_fisher_trace, generalized_fisher_trace
from secorder_hooks.errors import LossShapeError

__all__ = [
    "LossShapeError",
    "empirical_fisher_diagonal",
    "generalized_fisher_diagonal",
    "empirical_fisher_trace",
    "generalized_fisher_trace",
]
