"""Layer rules: one small rule per module type, looked up along the class MRO."""

from secorder_hooks.rules import conv, embedding, generic, linear, norm  # noqa: F401  (registers the built-in rules)
from secorder_hooks.rules.base import FunctionRule, LayerRule, register_rule, registered_rule
from secorder_hooks.rules.lookup import rule_for

__all__ = ["LayerRule", "FunctionRule", "register_rule", "registered_rule", "rule_for"]
