"""Print a markdown table of our quantities as ``time / T0`` on the standard problems A, B, C and ``small``.

Usage: ``python benchmarks/table.py [--reps 15] [--problems A B C small] [--min-time 0.05]``.

Every cell is ``median [q1, q3]`` of ``time / T0`` over interleaved repetitions (see
``timing.py``), ``.grad`` included. Beside our figures: the targets of the issues and
BackPACK 1.7.1's figures measured on this machine (DESIGN.md sec. 4). The row ``alloc [N,D]``
is the time to allocate and fill the ``[N, D]`` per-example gradient tensor, the memory
bound that the BatchGrad target refers to. A quantity that raises shows ``error: ...``. The
problem ``small`` (a 4-layer 64-wide MLP on 8 examples, ``T0`` about 0.3 ms) shows the engine's
fixed cost per step.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from functools import partial

from ours import ATTRIBUTES, OurQuantity, alloc_step, engine_step, plain_step, try_step
from problems import OVERHEAD, STANDARD, ProblemName, make_problem
from timing import Ratio, machine_description, reset_parameters, setup_torch, time_interleaved

__all__ = ["BACKPACK", "Target", "TARGETS", "measure", "render", "main"]

T0, ALLOC = "T0", "alloc [N,D]"
A, B, C = ProblemName.A, ProblemName.B, ProblemName.C
DEFAULT_PROBLEMS = (*STANDARD, OVERHEAD)

BACKPACK: dict[OurQuantity, tuple[float, float, float]] = {
    OurQuantity.SUM_GRAD_SQUARED: (1.9, 2.8, 2.3),
    OurQuantity.BATCH_L2_GRAD: (1.5, 1.9, 1.8),
    OurQuantity.VARIANCE: (2.8, 4.2, 3.2),
    OurQuantity.DIAG_GGN_EXACT: (4.0, 8.1, 3.7),
    OurQuantity.DIAG_GGN_MC: (2.4, 2.3, 2.8),
    OurQuantity.DIAG_HESSIAN: (4.5, 7.5, 275.0),
    OurQuantity.BATCH_GRAD: (35.0, 2.7, 32.0),
}
"""BackPACK 1.7.1, ``time / T0`` on A, B, C, measured on this machine (DESIGN.md sec. 4)."""


@dataclass(frozen=True)
class Target:
    """An upper bound on ``time / T0`` for one problem.

    Attributes:
        bound: The bound, or a factor of the ``alloc [N,D]`` ratio when ``of_alloc``.
        of_alloc: Whether ``bound`` multiplies the measured allocation ratio.
    """

    bound: float
    of_alloc: bool = False

    def limit(self, alloc: float | None) -> float | None:
        """The bound in units of ``T0`` (``None`` if it needs an unmeasured allocation ratio)."""
        if not self.of_alloc:
            return self.bound
        return None if alloc is None else self.bound * alloc

    def __str__(self) -> str:
        return f"<= {self.bound:g}x alloc" if self.of_alloc else f"<= {self.bound:.3g}"


def _uniform(bound: float) -> dict[ProblemName, Target]:
    return {p: Target(bound) for p in STANDARD}


TARGETS: dict[OurQuantity, dict[ProblemName, Target]] = {
    OurQuantity.BATCH_GRAD: {A: Target(1.2, of_alloc=True), B: Target(1.3), C: Target(1.2, of_alloc=True)},
    OurQuantity.SUM_GRAD_SQUARED: {**_uniform(1.4), A: Target(1.55)},
    OurQuantity.BATCH_L2_GRAD: {**_uniform(1.3), A: Target(1.2), OVERHEAD: Target(1.6)},
    OurQuantity.VARIANCE: _uniform(1.5),
    OurQuantity.DIAG_GGN_EXACT: {A: Target(0.75 * 4.0), B: Target(0.75 * 8.1)},
    OurQuantity.DIAG_GGN_MC: _uniform(2.0),
    OurQuantity.DIAG_HESSIAN: {A: Target(0.75 * 4.5), B: Target(0.75 * 7.5), C: Target(0.1 * 275.0)},
}
"""Targets of issues 2 (first order), 3 (second order) and 12 (the engine's fixed cost: BatchL2Grad on A and
``small``, SumGradSquared on A, whose flop floor is 1.44), ``.grad`` included."""


def measure(
    problems: list[ProblemName], quantities: list[OurQuantity], reps: int, min_time: float
) -> dict[ProblemName, dict[str, Ratio | str]]:
    """Time ``T0``, the allocation row and every quantity, interleaved per problem.

    Returns:
        Problem -> row label -> :class:`Ratio`, or the error string of a quantity that raised.
    """
    results: dict[ProblemName, dict[str, Ratio | str]] = {}
    for name in problems:
        problem = make_problem(name)
        steps = {T0: plain_step(problem), ALLOC: alloc_step(problem)}
        cells: dict[str, Ratio | str] = {}
        for quantity in quantities:
            step = engine_step(problem, quantity)
            error = try_step(step)
            if error is None:
                steps[quantity.value] = step
            else:
                cells[quantity.value] = error
        release = partial(reset_parameters, problem.model, ATTRIBUTES)  # frees a step's results, untimed
        cells.update(
            time_interleaved(steps, baseline=T0, reps=reps, min_time=min_time, cleanups=dict.fromkeys(steps, release))
        )
        results[name] = cells
        print(f"# measured {name.value} (T0 = {cells[T0].seconds * 1e3:.2f} ms)", file=sys.stderr)
    return results


def _verdict(cell: Ratio | str | None, target: Target | None, alloc: Ratio | str | None) -> str:
    if target is None or not isinstance(cell, Ratio):
        return ""
    limit = target.limit(alloc.median if isinstance(alloc, Ratio) else None)
    if limit is None:
        return ""
    return "ok" if cell.median <= limit else f"MISS (> {limit:.3g})"


def render(results: dict[ProblemName, dict[str, Ratio | str]], quantities: list[OurQuantity]) -> str:
    """The markdown table (rows: quantities, then ``alloc [N,D]``; one column per problem)."""
    problems = list(results)
    header = ["quantity", *[f"{p.value}: ours" for p in problems], "target", "verdict", "BackPACK (A / B / C)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for quantity in quantities:
        cells = [str(results[p].get(quantity.value, "")) for p in problems]
        targets = TARGETS.get(quantity, {})
        target_text = "; ".join(f"{p.value} {target}" for p, target in targets.items()) or "-"
        verdicts = [
            f"{p.value} {v}"
            for p in problems
            if (v := _verdict(results[p].get(quantity.value), targets.get(p), results[p].get(ALLOC)))
        ]
        backpack = " / ".join(f"{v:g}" for v in BACKPACK[quantity]) if quantity in BACKPACK else "-"
        lines.append(f"| {quantity.value} | " + " | ".join([*cells, target_text, ", ".join(verdicts), backpack]) + " |")
    lines.append(f"| {ALLOC} | " + " | ".join([*[str(results[p][ALLOC]) for p in problems], "-", "", "-"]) + " |")
    t0 = ", ".join(f"{p.value} {results[p][T0].seconds * 1e3:.2f} ms" for p in problems)
    return "\n".join([*lines, "", f"T0 (plain forward+loss+backward): {t0}. Cells: median [q1, q3] of time / T0."])


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problems", nargs="+", default=[p.value for p in DEFAULT_PROBLEMS], choices=[p.value for p in ProblemName]
    )
    parser.add_argument(
        "--quantities", nargs="+", default=[q.value for q in OurQuantity], choices=[q.value for q in OurQuantity]
    )
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per measurement (default 0.05)")
    args = parser.parse_args(argv)
    setup_torch()
    problems = [ProblemName(p) for p in args.problems]
    quantities = [OurQuantity(q) for q in args.quantities]
    results = measure(problems, quantities, reps=args.reps, min_time=args.min_time)
    print(f"Machine: {machine_description()}\n")
    print(render(results, quantities))


if __name__ == "__main__":
    main()
