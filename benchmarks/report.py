"""Render the comparison (``compare.py``) as markdown, reStructuredText, JSON and a plot.

One table per problem: a row per quantity, a column per library. A timed cell reads
``median [q1, q3]`` of ``time / T0`` and the peak memory over ``T0``; a combination that
failed or was not run shows a numbered note with the peer's error; a result that disagrees
with ours says so (also a note).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["Report", "load", "write_outputs"]

Outcome = dict[str, Any]


@dataclass
class Report:
    """What ``compare.py`` measured.

    Attributes:
        machine: One line describing the machine.
        versions: Distribution -> version.
        settings: Repetitions, timing and precision settings.
        seconds: Wall-clock time of the whole comparison.
        results: Problem -> outcomes (``compare.Outcome`` as dicts); the first is ``T0``.
    """

    machine: str
    versions: dict[str, str]
    settings: str
    seconds: float
    results: dict[str, list[Outcome]]


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


@dataclass
class _Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str]


def _cell(outcome: Outcome, notes: list[str]) -> str:
    def note(text: str) -> str:
        notes.append(f"{outcome['peer']}, {outcome['quantity']}: {text}")
        return f"[{len(notes)}]"

    error = outcome["error"]
    if error == "not offered":
        return "-"
    if error:
        return ("not run " if error.startswith("not run") else "error ") + note(error)
    if outcome["median"] is None:
        return "?"
    text = f"{_fmt(outcome['median'])} [{_fmt(outcome['q1'])}, {_fmt(outcome['q3'])}]"
    if outcome["memory_mb"] is not None:
        text += f", {outcome['memory_mb']:+.0f} MB"
    if outcome["agreement"].startswith("DISAGREES"):
        text += " DISAGREES " + note(outcome["agreement"])
    return text


def _tables(report: Report) -> list[_Table]:
    tables = []
    for problem, outcomes in report.results.items():
        t0, rest = outcomes[0], outcomes[1:]
        peers = list(dict.fromkeys(o["peer"] for o in rest))
        quantities = list(dict.fromkeys(o["quantity"] for o in rest))
        by_key = {(o["peer"], o["quantity"]): o for o in rest}
        notes: list[str] = []
        rows = []
        for quantity in quantities:
            rows.append(
                [quantity, *[_cell(by_key[(p, quantity)], notes) if (p, quantity) in by_key else "-" for p in peers]]
            )
        legend = sorted({f"{o['peer']} {o['quantity']}: {o['note']}" for o in rest if o["note"] and not o["error"]})
        memory = f", peak memory {t0['memory_mb']:.0f} MB" if t0["memory_mb"] is not None else ""
        title = f"Problem {problem} (T0 = {float(t0['extra']['seconds']) * 1e3:.2f} ms{memory})"
        tables.append(_Table(title, ["quantity", *peers], rows, [*notes, *(f"({entry})" for entry in legend)]))
    return tables


def _preamble(report: Report) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    return [
        f"Machine: {report.machine}.",
        f"Versions: {versions}.",
        f"Settings: {report.settings}; whole comparison took {report.seconds:.0f} s.",
        "Cells: median [q1, q3] of time / T0 (T0 = plain forward + loss + backward, same run), "
        "then peak memory over T0's peak (fresh subprocess each).",
    ]


def to_markdown(report: Report) -> str:
    """All tables as markdown."""
    lines = [*(f"{line}  " for line in _preamble(report)), ""]
    for table in _tables(report):
        lines += [f"### {table.title}", "", "| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table.rows]
        lines += (
            [""] + [f"{i}. {n}" if not n.startswith("(") else f"- {n}" for i, n in enumerate(table.notes, 1)] + [""]
        )
    return "\n".join(lines)


def _rst_escape(text: str) -> str:
    return re.sub(r"([\\*`|_])", r"\\\1", text)


def to_rst(report: Report) -> str:
    """All tables as reStructuredText ``list-table`` directives (included by the docs)."""
    lines = [*(_rst_escape(line) + "\n" for line in _preamble(report))]
    for table in _tables(report):
        lines += [_rst_escape(table.title), "~" * len(_rst_escape(table.title)), ""]
        lines += [".. list-table::", "   :header-rows: 1", ""]
        for row in [table.header, *table.rows]:
            lines += ["   * - " + _rst_escape(row[0]), *[f"     - {_rst_escape(c)}" for c in row[1:]]]
        numbered = [n for n in table.notes if not n.startswith("(")]
        legend = [n for n in table.notes if n.startswith("(")]
        lines += ["", *(f"{i}. {_rst_escape(n)}" for i, n in enumerate(numbered, 1)), ""]
        lines += [*(f"- {_rst_escape(n)}" for n in legend), ""]
    return "\n".join(lines)


def plot(report: Report, path: Path) -> bool:
    """Grouped bars of the median ``time / T0`` (log scale), one panel per problem; hatched: disagrees."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return False
    problems = list(report.results)
    fig, axes = plt.subplots(len(problems), 1, figsize=(11, 3.2 * len(problems)), squeeze=False)
    for ax, problem in zip(axes[:, 0], problems):
        rest = report.results[problem][1:]
        peers = list(dict.fromkeys(o["peer"] for o in rest))
        quantities = list(dict.fromkeys(o["quantity"] for o in rest))
        width = 0.8 / len(peers)
        for j, peer in enumerate(peers):
            for i, quantity in enumerate(quantities):
                match = [o for o in rest if o["peer"] == peer and o["quantity"] == quantity and o["median"]]
                if match:
                    disagrees = match[0]["agreement"].startswith("DISAGREES")
                    ax.bar(i + j * width, match[0]["median"], width, color=f"C{j}", hatch="//" if disagrees else None)
        ax.set_yscale("log")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(quantities))], quantities, fontsize=8)
        ax.set_ylabel("time / T0")
        ax.set_title(f"problem {problem}")
        handles = [Patch(color=f"C{j}", label=peer) for j, peer in enumerate(peers)]
        ax.legend(handles=handles, fontsize=7, ncol=len(peers))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def load(path: Path) -> Report:
    """Read a ``compare.json`` written by :func:`write_outputs`."""
    return Report(**json.loads(path.read_text()))


def write_outputs(report: Report, folder: Path) -> list[Path]:
    """Write ``compare.{md,rst,json,png}`` to ``folder``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("compare.md", to_markdown(report)),
        ("compare.rst", to_rst(report)),
        ("compare.json", json.dumps(asdict(report), indent=1)),
    ):
        (folder / name).write_text(text)
        written.append(folder / name)
    if plot(report, folder / "compare.png"):
        written.append(folder / "compare.png")
    return written
