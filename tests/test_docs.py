"""Run every Python example of the documentation and the README.

Collected: ``.. code-block:: python`` (also ``code``/``sourcecode``, ``py``/``pycon``),
``.. testcode::`` and ``.. doctest::`` directives and bare ``>>>`` paragraphs of
``docs/**/*.rst``, and the fenced ``python``/``pycon`` blocks of ``README.md``. One test
per block, each in a fresh namespace: every example is self-contained, so a reader can copy
any block alone and run it. Blocks made of ``>>>`` lines are doctests: their printed
output is compared with the expected output.
"""

from __future__ import annotations

import doctest
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PYTHON_LANGUAGES = {"python", "py", "python3", "pycon", ""}
DIRECTIVE = re.compile(
    r"^(?P<indent>\s*)\.\. (?P<kind>code-block|code|sourcecode|testcode|doctest)::\s*(?P<lang>\S*)\s*$"
)
FENCE = re.compile(r"^\s*```\s*(?P<lang>\w*)\s*$")


@dataclass(frozen=True)
class Block:
    """One example: its page, 1-based first line and source code."""

    page: str
    line: int
    code: str

    @property
    def is_doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")


def _dedent(lines: list[str]) -> str:
    indents = [len(line) - len(line.lstrip()) for line in lines if line.strip()]
    cut = min(indents, default=0)
    return "\n".join(line[cut:] for line in lines).strip("\n") + "\n"


def rst_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """Python code blocks and ``>>>`` paragraphs of a reStructuredText file."""
    lines = path.read_text().splitlines()
    page = str(path.relative_to(root))
    blocks, i = [], 0
    while i < len(lines):
        match = DIRECTIVE.match(lines[i])
        if match:
            indent, kind, lang = len(match["indent"]), match["kind"], match["lang"].lower()
            i += 1
            while i < len(lines) and re.match(r"^\s+:[\w-]+:", lines[i]):  # directive options
                i += 1
            start, body = i, []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                body.append(lines[i])
                i += 1
            runs_python = kind in ("testcode", "doctest") or lang in PYTHON_LANGUAGES - {""}
            if runs_python and any(line.strip() for line in body):
                blocks.append(Block(page, start + 1, _dedent(body)))
        elif lines[i].lstrip().startswith(">>>"):
            start, body = i, []
            while i < len(lines) and lines[i].strip():
                body.append(lines[i])
                i += 1
            blocks.append(Block(page, start + 1, _dedent(body)))
        else:
            i += 1
    return blocks


def markdown_blocks(path: Path, root: Path = ROOT) -> list[Block]:
    """Fenced ``python`` / ``pycon`` blocks of a Markdown file."""
    lines = path.read_text().splitlines()
    page = str(path.relative_to(root))
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        i += 1
        if not match:
            continue
        start, body = i, []
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i])
            i += 1
        i += 1  # closing fence
        if match["lang"].lower() in PYTHON_LANGUAGES - {""}:
            blocks.append(Block(page, start + 1, _dedent(body)))
    return blocks


def collect_blocks() -> list[Block]:
    blocks = [b for path in sorted((ROOT / "docs").rglob("*.rst")) for b in rst_blocks(path)]
    readme = ROOT / "README.md"
    return blocks + (markdown_blocks(readme) if readme.exists() else [])


BLOCKS = collect_blocks()


def run_block(block: Block, namespace: dict) -> None:
    """Execute one block in ``namespace``; doctest blocks must print what they show."""
    name = f"{block.page}:{block.line}"
    if block.is_doctest:
        test = doctest.DocTestParser().get_doctest(block.code, namespace, name, block.page, block.line - 1)
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
        report: list[str] = []
        runner.run(test, out=report.append, clear_globs=False)
        if runner.failures:
            pytest.fail("".join(report), pytrace=False)
    else:
        exec(compile(block.code, name, "exec"), namespace)


OPTIONAL_MODULES = {"laplace", "matplotlib"}
"""Optional dependencies: an example that needs one that is not installed is skipped."""


@pytest.mark.parametrize("block", BLOCKS, ids=[f"{b.page}:{b.line}" for b in BLOCKS])
def test_example(block: Block) -> None:
    try:
        run_block(block, {"__name__": "docs_example"})
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in OPTIONAL_MODULES:
            raise
        pytest.skip(f"needs the optional {err.name}")


def test_examples_are_collected() -> None:
    pages = {b.page for b in BLOCKS}
    assert {"docs/quickstart.rst", "docs/engine.rst", "docs/conventions.rst", "README.md"} <= pages
    assert all(b.code.strip() for b in BLOCKS)


def test_extractor_handles_directives_doctests_and_fences(tmp_path: Path) -> None:
    rst = tmp_path / "page.rst"
    rst.write_text(
        "Title\n=====\n\n.. code-block:: python\n   :caption: x\n\n   a = 1\n\n   b = a + 1\n\n"
        "Text.\n\n.. code-block:: bash\n\n   echo no\n\n>>> a + b\n3\n\n.. testcode::\n\n   c = 3\n"
    )
    blocks = rst_blocks(rst, tmp_path)
    assert [b.code for b in blocks] == ["a = 1\n\nb = a + 1\n", ">>> a + b\n3\n", "c = 3\n"]
    assert blocks[1].is_doctest and not blocks[0].is_doctest
    namespace: dict = {}
    for b in blocks:
        run_block(b, namespace)
    assert namespace["c"] == 3
    with pytest.raises(pytest.fail.Exception):
        run_block(Block("x", 1, ">>> 1 + 1\n3\n"), {})
    md = tmp_path / "README.md"
    md.write_text("# T\n\n```bash\nls\n```\n\n```python\nx = 2\n```\n")
    assert [b.code for b in markdown_blocks(md, tmp_path)] == ["x = 2\n"]
