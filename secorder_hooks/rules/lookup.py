"""The rule the engine uses for a module: the registered one, else the generic fallback."""

from __future__ import annotations

from torch import nn

from secorder_hooks.rules.base import LayerRule, registered_rule
from secorder_hooks.rules.generic import GENERIC_RULE
from secorder_hooks.rules.reparametrized import Reparametrization, wrap_reparametrized

__all__ = ["rule_for"]


def rule_for(module: nn.Module, reparams: tuple[Reparametrization, ...] | None = None) -> LayerRule:
    """The registered rule for ``module``, or the generic torch.func fallback.

    For a module with reparametrized tensors (``torch.nn.utils.parametrizations``, the
    deprecated weight-norm hook), that rule wrapped in a
    :class:`~secorder_hooks.rules.reparametrized.ReparametrizedRule`, which maps its
    quantities of the effective tensors to the trainable originals.

    Args:
        module: The module.
        reparams: ``reparametrizations(module)`` if the caller has it already (``None``: found here).
    """
    return wrap_reparametrized(module, registered_rule(module) or GENERIC_RULE, reparams)
