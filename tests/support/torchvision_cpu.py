"""Import torchvision 0.28.0 (a CUDA build, the only one for torch 2.13.0) on a CPU-only torch.

On a CPU-only torch the C extension of that build does not load, and ``import torchvision``
then fails in ``torchvision/_meta_registrations.py``, which registers fake kernels for two
operators without checking that the extension defined them. The code under test calls none
of the extension's operators (detection ops), so declaring the two schemas (no kernel) lets
the import finish. Done only when the import fails for exactly this reason.

Packages that import torchvision themselves need this to have run first: laplace-torch
imports torchmetrics, which imports torchvision where it is installed. The root
``conftest.py`` and ``docs/conf.py`` call :func:`load_torchvision` before anything else can
import it. Plain Python (no pytest), for the documentation build too.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch

__all__ = ["load_torchvision"]

_TORCHVISION_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_shim: list[torch.library.Library] = []


def load_torchvision() -> ModuleType | None:
    """``torchvision``, imported (declaring the two schemas where its extension is missing), or ``None``.

    Raises:
        RuntimeError: The import fails for another reason than the two missing operators.
    """
    if importlib.util.find_spec("torchvision") is None:
        return None
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if _shim or "torchvision::" not in str(err):
            raise
    library = torch.library.Library("torchvision", "DEF")
    for schema in _TORCHVISION_SCHEMAS.values():
        library.define(schema)
    _shim.append(library)
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left half-initialized modules
    return importlib.import_module("torchvision")
