"""Sphinx configuration of the secorder_hooks documentation (built with ``sphinx-build -W``)."""

import secorder_hooks

project = "secorder_hooks"
author = "secorder_hooks developers"
copyright = "2026, secorder_hooks developers"
release = secorder_hooks.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx.ext.viewcode",
]

# The package is imported for real: every documented object must import.
autodoc_mock_imports: list[str] = []
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

nitpicky = False
exclude_patterns = ["_build"]
templates_path: list[str] = []
html_theme = "alabaster"
html_static_path: list[str] = []
html_theme_options = {"description": "Per-example gradients and curvature diagonals for PyTorch"}
