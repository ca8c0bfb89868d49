"""Side-by-side comparison of our quantities with the installed peers.

Usage::

    python benchmarks/compare.py [--problems A B C resnet transformer gpt2 resnet18] [--quantities ...]
        [--peers ours BackPACK Opacus torch.func ASDL torch-secorder] [--reps 5]
        [--min-time 0.03] [--no-memory] [--out benchmarks/results] [--from-json compare.json]

For every problem: each (peer, quantity) combination is built on its own copy of the
problem and run once; its result is checked against ours (relative error of every
parameter's tensor, in our convention) before anything is timed. Then ``T0`` and every
working combination are timed interleaved (``timing.py``): ``time / T0``, median and IQR.
Finally the peak memory of each combination is measured in a fresh subprocess: the rise of
the resident set's high-water mark over two steps, after imports and set-up, minus the same
for ``T0``. Writes ``compare.md``, ``compare.rst`` (included by ``docs/benchmarks.rst``),
``compare.json`` and, with matplotlib, ``compare.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

from ours import OurQuantity, plain_step
from peers import Built, Method, NotRunError, Peer, Result, methods_for
from problems import ALL, ProblemName, make_problem
from report import ERROR_CHARS, Report, load, write_outputs
from timing import machine_description, reset_parameters, setup_torch, time_interleaved

__all__ = ["Outcome", "agreement", "compare_problem", "main"]

T0 = "T0"
RTOL = 1e-3
"""Largest relative error (float32) at which a peer counts as agreeing with us."""


@dataclass
class Outcome:
    """Everything measured for one (problem, peer, quantity)."""

    peer: str
    quantity: str
    note: str = ""
    error: str = ""
    agreement: str = ""
    median: float | None = None
    q1: float | None = None
    q3: float | None = None
    memory_mb: float | None = None
    extra: dict[str, str] = field(default_factory=dict)


def agreement(theirs: Result, ours: Result) -> str:
    """``"ok (...)"`` or ``"DISAGREES ..."``: worst relative Frobenius error over parameters."""
    missing = sorted(set(ours) - set(theirs))
    if missing:
        return f"DISAGREES: no result for {', '.join(missing[:3])}{'...' if len(missing) > 3 else ''}"
    worst, where = 0.0, ""
    for name, reference in ours.items():
        value = theirs[name]
        if value.shape != reference.shape:
            return f"DISAGREES: shape {tuple(value.shape)} vs ours {tuple(reference.shape)} for {name}"
        error = ((value - reference).norm() / reference.norm().clamp_min(1e-30)).item()
        if error > worst:
            worst, where = error, name
    if worst <= RTOL:
        return f"ok (rel. err. {worst:.0e})"
    return f"DISAGREES: rel. err. {worst:.2g} on {where}"


def _error_text(error: Exception) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, NotRunError):
        return text
    return f"{type(error).__name__}: {text[:ERROR_CHARS]}"


def compare_problem(name: ProblemName, methods: list[Method], reps: int, min_time: float) -> list[Outcome]:
    """Check, then time every method on problem ``name``; memory is filled in later."""
    outcomes: dict[str, Outcome] = {}
    built: dict[str, Built] = {}
    references: dict[OurQuantity, Result] = {}
    for method in sorted(methods, key=lambda m: m.peer != Peer.OURS):  # ours first: the references
        outcome = Outcome(method.peer.value, method.quantity.value, note=method.note)
        outcomes[method.key] = outcome
        try:
            ready = method.build(make_problem(name))
            ready.step()
            result = ready.result()
        except Exception as error:  # a peer's failure is a finding, not a crash
            outcome.error = _error_text(error)
            continue
        if method.peer == Peer.OURS:
            references[method.quantity] = result
        elif method.quantity in (OurQuantity.DIAG_GGN_MC, OurQuantity.KFAC):
            outcome.agreement = "stochastic: not compared"
        elif method.quantity in references:
            reference = references[method.quantity]
            if method.quantity == OurQuantity.KFLR:  # a peer may compare a subset (its conventions differ elsewhere)
                reference = {k: v for k, v in reference.items() if k in result}
            outcome.agreement = agreement(result, reference)
        else:
            outcome.agreement = "unchecked (ours failed)"
        ready.release()
        built[method.key] = ready
    steps = {T0: plain_step(make_problem(name)), **{k: b.step for k, b in built.items()}}
    ratios = time_interleaved(
        steps, baseline=T0, reps=reps, min_time=min_time, cleanups={k: b.release for k, b in built.items()}
    )
    for key, ratio in ratios.items():
        if key != T0:
            outcomes[key].median, outcomes[key].q1, outcomes[key].q3 = ratio.median, ratio.q1, ratio.q3
    t0 = Outcome("T0", "plain backward", median=1.0, q1=1.0, q3=1.0, extra={"seconds": f"{ratios[T0].seconds:.5f}"})
    return [t0, *outcomes.values()]


# ---- memory (one fresh subprocess per combination) ----------------------------------------


def _read_status(field_name: str) -> float:
    """``VmHWM`` / ``VmRSS`` of this process in MB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{field_name} not in /proc/self/status")


def memory_child(problem: str, key: str, steps: int = 2) -> None:
    """Subprocess body: set up, warm up, reset the high-water mark, run ``steps`` steps, print the rise.

    The warm-up step absorbs one-time costs that are not the method's memory (lazy imports:
    the first ``torch.autograd.grad`` with ``grad_outputs`` imports sympy, about 40 MB);
    its results are released before the base is read.
    """
    setup_torch()
    name = ProblemName(problem)
    if key == T0:
        model_problem = make_problem(name)
        step, release = plain_step(model_problem), partial(reset_parameters, model_problem.model)
    else:
        (method,) = [m for m in methods_for(list(Peer), list(OurQuantity)) if m.key == key]
        built = method.build(make_problem(name))
        step, release = built.step, built.release
    step()
    release()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _read_status("VmRSS")
    for _ in range(steps):
        step()
    print(json.dumps({"peak_mb": _read_status("VmHWM") - base}))


def _measure_memory(problem: ProblemName, key: str) -> float | None:
    command = [sys.executable, str(Path(__file__).resolve()), "--memory-child", problem.value, key]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]


def fill_memory(results: dict[ProblemName, list[Outcome]], workers: int = 2) -> None:
    """Peak memory over ``T0`` for every timed outcome (``T0`` itself: its own peak)."""
    jobs = [(p, o) for p, outcomes in results.items() for o in outcomes if o.median is not None]

    def run(job: tuple[ProblemName, Outcome]) -> None:
        problem, outcome = job
        key = T0 if outcome.peer == T0 else f"{outcome.peer}:{outcome.quantity}"
        outcome.memory_mb = _measure_memory(problem, key)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, jobs))
    for outcomes in results.values():
        base = outcomes[0].memory_mb
        for outcome in outcomes[1:]:
            if outcome.memory_mb is not None and base is not None:
                outcome.memory_mb -= base


def _versions() -> dict[str, str]:
    from importlib import metadata

    versions = {}
    for dist in ("torch", "secorder_hooks", "backpack-for-pytorch", "opacus", "asdfghjkl", "torch-secorder"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, compare, write the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--problems", nargs="+", default=[p.value for p in ALL], choices=[p.value for p in ProblemName]
    )  # the real-model problems (gpt2, resnet18: transformers / torchvision) only when named
    parser.add_argument(
        "--quantities", nargs="+", default=[q.value for q in OurQuantity], choices=[q.value for q in OurQuantity]
    )
    parser.add_argument("--peers", nargs="+", default=[p.value for p in Peer], choices=[p.value for p in Peer])
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions (default 5)")
    parser.add_argument("--min-time", type=float, default=0.03, help="seconds per measurement (default 0.03)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--from-json", type=Path, help="only re-render the outputs from an existing compare.json")
    parser.add_argument("--memory-child", nargs=2, metavar=("PROBLEM", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for category in (UserWarning, FutureWarning):  # peers' hook warnings; failures are reported
        warnings.filterwarnings("ignore", category=category)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.from_json:
        for path in write_outputs(load(args.from_json), args.out):
            print(f"wrote {path}", file=sys.stderr)
        return
    start = time.perf_counter()
    setup_torch()
    methods = methods_for([Peer(p) for p in args.peers], [OurQuantity(q) for q in args.quantities])
    results = {}
    for problem in [ProblemName(p) for p in args.problems]:
        results[problem] = compare_problem(problem, methods, reps=args.reps, min_time=args.min_time)
        print(f"# timed {problem.value} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if not args.no_memory:
        fill_memory(results)
        print(f"# memory done ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    report = Report(
        machine=machine_description(),
        versions=_versions(),
        settings=f"reps={args.reps}, min_time={args.min_time}s, seed 0, float32, {len(methods)} combinations",
        seconds=time.perf_counter() - start,
        results={p.value: [asdict(o) for o in outcomes] for p, outcomes in results.items()},
    )
    for path in write_outputs(report, args.out):
        print(f"wrote {path}", file=sys.stderr)
    print((args.out / "compare.md").read_text())


if __name__ == "__main__":
    main()
