"""Where the time of one quantity goes: torch.profiler op table and a cProfile of the Python side.

Usage: ``python benchmarks/profile_quantity.py --problem A --quantity SumGradSquared [--steps 20] [--top 15]``

Prints, for ``T0`` and for the quantity, the ``top`` operators by self CPU time (torch.profiler)
and the ``top`` Python functions by cumulative time (cProfile), over ``steps`` steps each.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats

from ours import OurQuantity, engine_step, plain_step
from problems import ProblemName, make_problem
from timing import setup_torch
from torch.profiler import ProfilerActivity, profile


def _torch_table(step, steps: int, top: int) -> str:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=40)


def _python_table(step, steps: int, top: int) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and print the profiles."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="A", choices=[p.value for p in ProblemName])
    parser.add_argument(
        "--quantity", default=OurQuantity.SUM_GRAD_SQUARED.value, choices=[q.value for q in OurQuantity]
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--no-python", action="store_true", help="skip the cProfile part")
    args = parser.parse_args(argv)
    setup_torch()
    problem = make_problem(args.problem)
    for label, step in (("T0", plain_step(problem)), (args.quantity, engine_step(problem, OurQuantity(args.quantity)))):
        step()  # warm-up
        print(f"===== {label} on {args.problem}: torch.profiler, {args.steps} steps =====")
        print(_torch_table(step, args.steps, args.top))
        if not args.no_python and label != "T0":
            print(f"===== {label} on {args.problem}: cProfile (cumulative), {args.steps} steps =====")
            print(_python_table(step, args.steps, args.top))


if __name__ == "__main__":
    main()
