"""Root pytest configuration: skip the doctest collection of modules whose optional extra is missing."""

from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("laplace") is None:  # the laplace-torch extra; the module raises on import without it
    collect_ignore.append("secorder_hooks/integrations/laplace.py")
