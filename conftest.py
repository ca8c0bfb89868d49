"""Root pytest configuration: optional packages made importable, doctests of missing extras skipped.

Loaded before any test module: torchvision is imported here (see :mod:`tests.support.torchvision_cpu`)
so that packages which import it themselves (laplace-torch through torchmetrics,
transformers) find it working.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent)
if ROOT not in sys.path:  # the tests import their helpers as ``tests.*`` (--import-mode=importlib)
    sys.path.insert(0, ROOT)

from tests.support.torchvision_cpu import load_torchvision  # noqa: E402

load_torchvision()

collect_ignore: list[str] = []
if importlib.util.find_spec("laplace") is None:  # the laplace-torch extra; the module raises on import without it
    collect_ignore.append("secorder_hooks/integrations/laplace.py")
