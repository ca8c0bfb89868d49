"""The package's layering: each folder one layer, imports only downward, no circles.

The layer order (lowest first) is documented in ``docs/layers.rst``. Checked here on the
source (``ast``: every import statement, module level, function level and under
``if TYPE_CHECKING``) and by importing every module first in a fresh interpreter.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "secorder_hooks"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

LAYERS: list[set[str]] = [
    {"errors", "_warnings"},
    {"enums", "autodiff"},
    {"losses", "quantities"},
    {"rules"},
    {"engine"},
    {"function_api"},
    {"core", "approximations", "integrations"},
    {"__init__"},
    {"demo"},
    {"__main__"},
]
"""Units (a subpackage, or a module directly in the package) by layer, lowest first. A unit
may import units of lower layers only; inside a unit, modules import each other without circles."""

OPTIONAL_IMPORTS: dict[str, set[str]] = {
    f"{PACKAGE}.function_api.progress": {"tqdm.auto"},  # a progress bar, when tqdm is installed
    f"{PACKAGE}.engine.sync": {"torch.nn.parallel"},  # DistributedDataParallel, where torch.distributed exists
}
"""The only function-local imports allowed: of optional dependencies, by module."""

OPTIONAL_MODULES: dict[str, str] = {f"{PACKAGE}.integrations.laplace": "laplace"}
"""Modules that need an optional distribution to import at all (skipped without it)."""

# Imports that break the layering and are still to be fixed, as (importing module, imported
# module); delete an entry once it is (test_known_violations_are_still_there fails for
# entries whose import is gone). None is left.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = [PACKAGE, *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


class _Imports(ast.NodeVisitor):
    """Every import of a module: ``(target, function-local)``."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.found: list[tuple[str, bool]] = []
        self._depth = 0

    def visit_FunctionDef(self, node: ast.AST) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_AsyncFunctionDef = visit_FunctionDef  # noqa: N815

    def visit_Import(self, node: ast.Import) -> None:
        self.found.extend((alias.name, self._depth > 0) for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:
            parts = self.module.split(".")
            anchor = parts if self.is_package else parts[:-1]
            anchor = anchor[: len(anchor) - node.level + 1]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:  # `from pkg import submodule` imports the submodule
            candidate = f"{base}.{alias.name}"
            self.found.append((candidate if candidate in _MODULES else base, self._depth > 0))


_PATHS = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}
_MODULES = set(_PATHS)


def _graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    """Imports between the package's modules, and the function-local imports (module, target)."""
    edges: dict[str, set[str]] = defaultdict(set)
    local: list[tuple[str, str]] = []
    for module, path in _PATHS.items():
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        for target, in_function in visitor.found:
            if in_function:
                local.append((module, target))
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                while target not in _MODULES:  # an attribute of a module: the module
                    target = target.rsplit(".", 1)[0]
                if target != module:
                    edges[module].add(target)
    return edges, local


def _rank(unit: str) -> int:
    for rank, units in enumerate(LAYERS):
        if unit in units:
            return rank
    raise AssertionError(f"unit {unit!r} of {PACKAGE} is in no layer of LAYERS; add it where it belongs")


def test_every_unit_has_a_layer() -> None:
    for module in _MODULES:
        _rank(_unit(module))


def test_imports_go_downward() -> None:
    edges, _ = _graph()
    wrong = [
        (a, b)
        for a, targets in edges.items()
        for b in targets
        if _unit(a) != _unit(b) and _rank(_unit(b)) >= _rank(_unit(a)) and (a, b) not in KNOWN_VIOLATIONS
    ]
    assert not wrong, "imports that do not go to a lower layer:\n" + "\n".join(f"  {a} -> {b}" for a, b in wrong)


def test_no_import_circles() -> None:
    edges, _ = _graph()
    edges = {a: {b for b in bs if (a, b) not in KNOWN_VIOLATIONS} for a, bs in edges.items()}
    cycles = _cycles(edges)
    assert not cycles, "import circles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_no_function_local_imports_but_optional_dependencies() -> None:
    _, local = _graph()
    wrong = [
        (m, t) for m, t in local if t not in OPTIONAL_IMPORTS.get(m, set()) and (m, _owner(t)) not in KNOWN_VIOLATIONS
    ]
    assert not wrong, "function-local imports:\n" + "\n".join(f"  {m}: {t}" for m, t in wrong)


def test_known_violations_are_still_there() -> None:
    """Each entry of KNOWN_VIOLATIONS still exists (delete the ones that are fixed)."""
    edges, local = _graph()
    found = {(a, b) for a, bs in edges.items() for b in bs} | {(m, _owner(t)) for m, t in local}
    fixed = sorted(KNOWN_VIOLATIONS - found)
    assert not fixed, "fixed, remove from KNOWN_VIOLATIONS: " + ", ".join(map(str, fixed))


def test_every_module_imports_first_in_a_fresh_interpreter() -> None:
    """Each module imports on its own, before any other module of the package (no order dependence)."""
    modules = sorted(m for m in _MODULES if m not in OPTIONAL_MODULES or importlib.util.find_spec(OPTIONAL_MODULES[m]))
    script = f"""
import importlib, json, sys, traceback, warnings
warnings.simplefilter("ignore")
import torch  # loaded once; the package's modules are reloaded for each module below
sys.path.insert(0, {str(ROOT.parent)!r})
from tests.support.torchvision_cpu import load_torchvision  # as the root conftest.py: laplace-torch imports torchvision
load_torchvision()
failed = {{}}
for name in {modules!r}:
    for loaded in [m for m in sys.modules if m == {PACKAGE!r} or m.startswith({PACKAGE!r} + ".")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
print(json.dumps(failed))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=True)
    failed = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failed, "\n".join(f"{name}:\n{tb}" for name, tb in failed.items())


def _owner(target: str) -> str:
    while target not in _MODULES and "." in target:
        target = target.rsplit(".", 1)[0]
    return target


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(_MODULES):
        if v not in index:
            visit(v)
    return result


@pytest.mark.parametrize("unit", sorted({u for layer in LAYERS for u in layer}))
def test_layers_name_existing_units(unit: str) -> None:
    assert any(_unit(m) == unit for m in _MODULES), f"LAYERS names {unit!r}, which is not part of {PACKAGE}"
