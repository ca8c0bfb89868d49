"""Render the comparison (``compare.py``) as markdown, reStructuredText, JSON and a plot.

Two tables per problem, a row per quantity and a column per library: the median of
``time / T0``, short enough to fit a page, then its interquartile range and the peak memory
over ``T0``. A combination that failed or was not run shows a numbered note with the
library's error; a result that disagrees with ours says so (also a note); a quantity a
library does not compute reads "not offered".
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


DISPLAY_NAMES = {"ours": "secorder_hooks"}
ERROR_CHARS = 160
"""Characters of an error message that ``compare.py`` keeps; a longer one is shown cut, with an ellipsis."""
NOT_OFFERED = "not offered"


def _name(peer: str) -> str:
    return DISPLAY_NAMES.get(peer, peer)


def _fmt(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


@dataclass
class _Table:
    """One problem: a short table of ratios, a second one of spread and memory, numbered notes."""

    title: str
    header: list[str]
    ratios: list[list[str]]
    spread: list[list[str]]
    notes: list[str]


def _ratio_cell(outcome: Outcome, notes: list[str]) -> str:
    def note(text: str) -> str:
        notes.append(f"{_name(outcome['peer'])}, {outcome['quantity']}: {text}")
        return f"[{len(notes)}]"

    error = outcome["error"]
    if error == NOT_OFFERED:
        return NOT_OFFERED
    if error.startswith("not run"):
        return "not run " + note(error)
    if error:
        message = error.split(": ", 1)[-1]
        return "error " + note(error + ("\u2026" if len(message) >= ERROR_CHARS else ""))
    if outcome["median"] is None:
        return "?"
    text = _fmt(outcome["median"])
    if outcome["agreement"].startswith("DISAGREES"):
        text += " disagrees " + note(outcome["agreement"].removeprefix("DISAGREES: "))
    return text


def _spread_cell(outcome: Outcome) -> str:
    error = outcome["error"]
    if error:
        return NOT_OFFERED if error == NOT_OFFERED else ("not run" if error.startswith("not run") else "error")
    if outcome["median"] is None:
        return "?"
    text = f"{_fmt(outcome['q1'])}\u2013{_fmt(outcome['q3'])}"
    if outcome["memory_mb"] is not None:
        megabytes = round(outcome["memory_mb"]) or 0  # no "-0"
        text += f", {megabytes:+d}\u00a0MB"  # a no-break space: number and unit stay on one line
    return text


def _tables(report: Report) -> list[_Table]:
    tables = []
    for problem, outcomes in report.results.items():
        t0, rest = outcomes[0], outcomes[1:]
        peers = list(dict.fromkeys(o["peer"] for o in rest))
        quantities = list(dict.fromkeys(o["quantity"] for o in rest))
        by_key = {(o["peer"], o["quantity"]): o for o in rest}
        notes: list[str] = []
        ratios, spread = [], []
        for quantity in quantities:
            cells = [by_key.get((p, quantity)) for p in peers]
            ratios.append([quantity, *(_ratio_cell(o, notes) if o else NOT_OFFERED for o in cells)])
            spread.append([quantity, *(_spread_cell(o) if o else NOT_OFFERED for o in cells)])
        memory = f", peak memory {t0['memory_mb']:.0f} MB" if t0["memory_mb"] is not None else ""
        title = f"Problem {problem} (T0 = {float(t0['extra']['seconds']) * 1e3:.2f} ms{memory})"
        tables.append(_Table(title, ["quantity", *map(_name, peers)], ratios, spread, notes))
    return tables


def _methods(report: Report) -> list[str]:
    """What each peer runs for a quantity, where it is not the quantity of the same name."""
    return sorted(
        {
            f"{_name(o['peer'])} {o['quantity']}: {o['note']}"
            for outcomes in report.results.values()
            for o in outcomes[1:]
            if o["note"] and not o["error"]
        }
    )


def _preamble(report: Report) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in report.versions.items())
    return [
        f"Machine: {report.machine}.",
        f"Versions: {versions}.",
        f"Settings: {report.settings}; whole comparison took {report.seconds:.0f} s.",
        "Cells: the median of time / T0 (T0 = plain forward + loss + backward, same run). The spread tables "
        "give its interquartile range q1\u2013q3 and the peak memory over T0's (fresh subprocess each).",
    ]


def to_markdown(report: Report) -> str:
    """All tables as markdown."""
    lines = [*(f"{line}  " for line in _preamble(report)), ""]
    lines += ["Methods of the peers:", "", *(f"- {m}" for m in _methods(report)), ""]
    for table in _tables(report):
        lines += [f"### {table.title}", ""]
        for rows in (table.ratios, table.spread):
            lines += ["| " + " | ".join(table.header) + " |", "|" + "---|" * len(table.header)]
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
            lines += [""]
        lines += [f"{i}. {n}" for i, n in enumerate(table.notes, 1)] + [""]
    return "\n".join(lines)


def _rst_escape(text: str) -> str:
    return re.sub(r"([\\*`|_])", r"\\\1", text)


def _rst_list_table(caption: str, header: list[str], rows: list[list[str]]) -> list[str]:
    lines = [f".. list-table:: {caption}", "   :header-rows: 1", "   :stub-columns: 1", ""]
    for row in [header, *rows]:
        lines += ["   * - " + _rst_escape(row[0]), *[f"     - {_rst_escape(c)}" for c in row[1:]]]
    return [*lines, ""]


def to_rst(report: Report) -> str:
    """The ratio tables and their notes as reStructuredText ``list-table`` directives (included by the docs)."""
    lines = [*(_rst_escape(line) + "\n" for line in _preamble(report))]
    lines += ["What the libraries run, where it differs from the quantity's name:", ""]
    lines += [*(f"- {_rst_escape(m)}" for m in _methods(report)), ""]
    for table in _tables(report):
        lines += [_rst_escape(table.title), "~" * len(_rst_escape(table.title)), ""]
        lines += _rst_list_table("time / T0 (median)", table.header, table.ratios)
        lines += [*(f"{i}. {_rst_escape(n)}" for i, n in enumerate(table.notes, 1)), ""]
    return "\n".join(lines)


def to_rst_spread(report: Report) -> str:
    """The spread and memory tables as reStructuredText (included by the docs after the ratios)."""
    lines = []
    for table in _tables(report):
        caption = f"{table.title}: q1\u2013q3 of time / T0, peak memory over T0"
        lines += _rst_list_table(_rst_escape(caption), table.header, table.spread)
    return "\n".join(lines)


def plot(report: Report, path: Path) -> bool:
    """Median ``time / T0`` (log scale) per quantity and library, one panel per problem, legend in the last.

    Hatched bars: results that disagree with ours. Markers below the bars: the library failed
    on the problem (x) or was not run because its method is too costly (o); nothing: not offered.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.patches import Patch
    except ImportError:
        return False
    problems = list(report.results)
    peers = list(dict.fromkeys(o["peer"] for outcomes in report.results.values() for o in outcomes[1:]))
    colors = {peer: f"C{j}" for j, peer in enumerate(peers)}
    columns = 2
    rows = (len(problems) + 1 + columns - 1) // columns  # one more panel for the legend
    with plt.rc_context({"font.size": 15, "axes.titlesize": 16, "hatch.linewidth": 1.5}):
        fig, axes = plt.subplots(rows, columns, figsize=(12, 4.6 * rows), squeeze=False)
        panels = list(axes.flat)
        for ax, problem in zip(panels, problems):
            rest = report.results[problem][1:]
            quantities = list(dict.fromkeys(o["quantity"] for o in rest))
            by_key = {(o["peer"], o["quantity"]): o for o in rest}
            width = 0.8 / len(peers)
            heights = [o["median"] for o in rest if o["median"]]
            floor = min([*heights, 1.0]) / 1.6
            for j, peer in enumerate(peers):
                for i, quantity in enumerate(quantities):
                    outcome = by_key.get((peer, quantity))
                    x = i - 0.4 + (j + 0.5) * width
                    if outcome is None or outcome["error"] == NOT_OFFERED:
                        continue
                    if outcome["error"]:
                        marker = "o" if outcome["error"].startswith("not run") else "x"
                        ax.plot(x, floor * 1.15, marker, color=colors[peer], markersize=8, markeredgewidth=2)
                    elif outcome["median"]:
                        disagrees = outcome["agreement"].startswith("DISAGREES")
                        ax.bar(
                            x,
                            outcome["median"] - floor,
                            width,
                            bottom=floor,
                            color=colors[peer],
                            hatch="//" if disagrees else None,
                            edgecolor="white" if disagrees else colors[peer],
                        )
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(quantities)), quantities, rotation=30, ha="right")
            ax.set_ylabel("time / T0")
            ax.set_title(f"problem {problem}")
            ax.grid(axis="y", which="major", alpha=0.3)
        legend_ax = panels[len(problems)]
        legend_ax.axis("off")
        handles = [Patch(color=colors[peer], label=_name(peer)) for peer in peers]
        handles += [
            Patch(facecolor="grey", edgecolor="white", hatch="//", label="result disagrees with secorder_hooks"),
            Line2D([], [], marker="x", linestyle="", color="grey", markersize=8, markeredgewidth=2, label="error"),
            Line2D([], [], marker="o", linestyle="", color="grey", markersize=8, label="not run (too costly)"),
            Line2D([], [], color="black", linewidth=0.8, label="T0: plain forward + backward"),
            Patch(facecolor="none", edgecolor="none", label="no bar, no mark: not offered"),
        ]
        legend_ax.legend(handles=handles, loc="center", frameon=False)
        for ax in panels[len(problems) + 1 :]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
    return True


def load(path: Path) -> Report:
    """Read a ``compare.json`` written by :func:`write_outputs`."""
    return Report(**json.loads(path.read_text()))


def write_outputs(report: Report, folder: Path) -> list[Path]:
    """Write ``compare.{md,rst,json,png}`` and ``compare-spread.rst`` to ``folder``; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in (
        ("compare.md", to_markdown(report)),
        ("compare.rst", to_rst(report)),
        ("compare-spread.rst", to_rst_spread(report)),
        ("compare.json", json.dumps(asdict(report), indent=1)),
    ):
        (folder / name).write_text(text)
        written.append(folder / name)
    if plot(report, folder / "compare.png"):
        written.append(folder / "compare.png")
    return written
