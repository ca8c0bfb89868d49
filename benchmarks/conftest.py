"""Make the benchmark modules importable by name when pytest collects ``benchmarks/``.

The scripts import each other as top-level modules (``from problems import ...``), which
works when they are run as ``python benchmarks/<script>.py``; pytest (``--import-mode=importlib``)
needs this folder on ``sys.path`` for the same imports.
"""

import sys
from pathlib import Path

import torch

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

torch.set_num_threads(2)
