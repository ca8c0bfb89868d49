"""Sphinx configuration of the secorder_hooks documentation (built with ``sphinx-build -W``)."""

import sys
from pathlib import Path

import secorder_hooks

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.torchvision_cpu import load_torchvision

load_torchvision()  # laplace-torch imports torchvision (through torchmetrics): see tests/support/torchvision_cpu.py

project = "secorder_hooks"
author = "secorder_hooks developers"
copyright = "2026, secorder_hooks developers"
release = secorder_hooks.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # a local copy of MathJax 3: maths render without network
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

# The package is imported for real: every documented object must import. The optional
# laplace-torch integration is documented without laplace installed.
try:
    import laplace  # noqa: F401

    autodoc_mock_imports: list[str] = []
except ImportError:
    autodoc_mock_imports = ["laplace"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# Every cross-reference must resolve (``-W`` makes a miss an error). Objects of other
# packages are not linked (no network at build time, so no intersphinx inventories).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|nn|collections|enum|typing|tqdm|laplace)(\..*)?"),
    (r"py:class", r"secorder_hooks\..*\.(R|L|_\w+)"),  # type variables and private helpers in signatures
]
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {
    "description": "Per-example gradients and curvature diagonals for PyTorch",
    "page_width": "1180px",  # the benchmark tables have seven columns
}
