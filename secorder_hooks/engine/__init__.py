"""The hook engine: records module calls and computes quantities in ``loss.backward()``."""

from secorder_hooks.engine.accumulate import clear_quantities
from secorder_hooks.engine.extend import extend
from secorder_hooks.engine.options import EngineOptions

__all__ = ["extend", "EngineOptions", "clear_quantities"]
