"""The user-facing pages speak to users: no work notes, no empty table cells."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
USER_PAGES = [
    ROOT / "docs" / "benchmarks.rst",
    ROOT / "docs" / "comparison.rst",
    ROOT / "benchmarks" / "results" / "compare.rst",
    ROOT / "benchmarks" / "results" / "compare-spread.rst",
]
WORK_NOTES = re.compile(
    r"\bthe issue\b|\bissues? \d|\btargets? (table|of)\b|\bverdict|\bmet on\b|\bmiss on\b|\btoday\b|"
    r"\b(January|February|March|April|May|June|July|August|September|October|November|December) \d{4}\b|"
    r"design notes|original documentation",
    re.IGNORECASE,
)


@pytest.mark.parametrize("page", USER_PAGES, ids=lambda p: p.name)
def test_page_has_no_work_notes(page: Path) -> None:
    hits = [(i, line) for i, line in enumerate(page.read_text().splitlines(), 1) if WORK_NOTES.search(line)]
    assert not hits, f"{page.name}: {hits}"


@pytest.mark.parametrize("page", USER_PAGES[2:], ids=lambda p: p.name)
def test_generated_tables_have_no_empty_cells(page: Path) -> None:
    """A list-table cell ``- -`` renders as an empty bullet: absent combinations read "not offered"."""
    cells = [line for line in page.read_text().splitlines() if re.match(r"^\s+(\* )?- ", line)]
    assert cells
    assert not [c for c in cells if re.fullmatch(r"\s+(\* )?- -?\s*", c)]
    assert any(c.strip() == "- not offered" for c in cells)
