"""A tour of the library on two small built-in problems: ``python -m secorder_hooks``.

For each problem (a tanh MLP with MSE loss, a small CNN with cross-entropy, both on
synthetic data) the demo computes every quantity of :mod:`secorder_hooks.quantities`
inside :func:`secorder_hooks.extend`, prints the Frobenius norm of each quantity per
parameter, and the time each quantity took relative to ``T0``, one plain
forward + loss + backward pass of the same problem. A quantity the installed version
cannot compute (it raises ``NotImplementedError`` or a :class:`~secorder_hooks.SecorderError`)
is shown as ``n/a``.

Every problem is built from its own seed and every quantity's values come from one
seeded, untimed backward pass, so the printed norms (the Monte-Carlo ones included) do
not depend on ``--repeats``, ``--threads`` or on which problems and quantities are chosen.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn

import secorder_hooks
from secorder_hooks.errors import SecorderError
from secorder_hooks.quantities import EKFAC, Quantity

__all__ = [
    "ProblemName",
    "Problem",
    "QuantityResult",
    "available_quantities",
    "builtin_problems",
    "allocation_seconds",
    "main",
    "run_problem",
]

NOT_AVAILABLE = "n/a"
SEED = 0
"""Seed of every problem's model and data, and of every quantity's Monte-Carlo samples."""
DEFAULT_REPEATS = 20


class ProblemName(str, Enum):
    """The built-in problems, as named on the command line."""

    MLP = "mlp"
    CNN = "cnn"


@dataclass
class Problem:
    """A model, a batch and a loss function ``loss_fn(output, target) -> scalar``."""

    name: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]

    def forward_backward(self) -> None:
        """One forward pass, loss and ``loss.backward()``."""
        self.model.zero_grad(set_to_none=True)
        self.loss_fn(self.model(self.inputs), self.targets).backward()


@dataclass
class QuantityResult:
    """What the demo measured for one quantity.

    Attributes:
        quantity: The quantity.
        seconds: Median wall time of one backward pass computing it, ``None`` if n/a.
        norms: Frobenius norm of the quantity per parameter name (empty if n/a).
        error: Why the quantity is not available, ``None`` if it is.
        ratio: Median of its time over the time of a plain pass (``T0``) measured next to it.
    """

    quantity: Quantity
    seconds: float | None
    norms: dict[str, float]
    error: str | None = None
    ratio: float | None = None


def available_quantities() -> list[Quantity]:
    """One default instance of every quantity class the package exports."""
    classes = [getattr(secorder_hooks, name) for name in secorder_hooks.__all__]
    return [
        cls()
        for cls in classes
        if isinstance(cls, type) and issubclass(cls, Quantity) and hasattr(cls, "attribute")  # not the base classes
    ]


def _norm(value: Tensor | list[Tensor], quantity: Quantity) -> float:
    """Frobenius norm of a quantity's value, for Kronecker factors that of the block they stand for.

    ``||B (x) A|| = ||B|| ||A||``; EK-FAC's block has the norm of its diagonal ``S`` (its bases are orthogonal).
    """
    if isinstance(value, Tensor):
        return value.norm().item()
    if isinstance(quantity, EKFAC):
        return value[-1].norm().item()
    return math.prod(f.norm().item() for f in value)


def _mlp(batch_size: int) -> Problem:
    model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
    inputs, targets = torch.randn(batch_size, 64), torch.randn(batch_size, 10)
    return Problem("MLP 64-128-64-10, tanh, MSELoss(mean)", model, inputs, targets, nn.MSELoss())


def _cnn(batch_size: int) -> Problem:
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
    )
    inputs, targets = torch.randn(batch_size, 3, 16, 16), torch.randint(0, 10, (batch_size,))
    return Problem(
        "CNN 3x16x16, conv-relu-pool-linear, CrossEntropyLoss(mean)", model, inputs, targets, nn.CrossEntropyLoss()
    )


_BUILDERS: dict[ProblemName, Callable[[int], Problem]] = {ProblemName.MLP: _mlp, ProblemName.CNN: _cnn}


def builtin_problems(batch_size: int = 64, names: Sequence[ProblemName] = tuple(ProblemName)) -> list[Problem]:
    """The chosen problems on synthetic data, each built from :data:`SEED` (global RNG untouched).

    ``mlp``: a tanh MLP with ``MSELoss()``; ``cnn``: a small CNN with ``CrossEntropyLoss()``.
    """
    problems = []
    for name in names:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            problems.append(_BUILDERS[ProblemName(name)](batch_size))
    return problems


MIN_MEASUREMENT_SECONDS = 0.01
"""A measurement repeats a fast pass back to back until it lasts this long (averages out preemption)."""


def _seconds(fn: Callable[[], None], calls: int = 1) -> float:
    """Mean wall time of ``calls`` back-to-back calls of ``fn()``."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _calls_for(fn: Callable[[], None]) -> int:
    """Calls of ``fn`` that last about :data:`MIN_MEASUREMENT_SECONDS`, from one (warm-up) call."""
    return max(1, math.ceil(MIN_MEASUREMENT_SECONDS / max(_seconds(fn), 1e-9)))


def _median_time(fn: Callable[[], None], repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after one warm-up call.

    The median, not the mean or the minimum: robust to the outliers of a busy machine
    in both directions.
    """
    calls = _calls_for(fn)
    return statistics.median(_seconds(fn, calls) for _ in range(repeats))


def _median_ratio(fn: Callable[[], None], reference: Callable[[], None], repeats: int) -> tuple[float, float]:
    """Median of ``time(fn) / time(reference)`` over ``repeats`` adjacent pairs, and ``fn``'s median time.

    Timing each pass next to a reference pass cancels most of the drift of a shared machine's load.
    """
    calls, reference_calls = _calls_for(fn), _calls_for(reference)
    pairs = [(_seconds(fn, calls), _seconds(reference, reference_calls)) for _ in range(repeats)]
    return statistics.median(t / t_ref for t, t_ref in pairs), statistics.median(t for t, _ in pairs)


def allocation_seconds(problem: Problem, repeats: int = DEFAULT_REPEATS) -> float:
    """Median time of allocating and zero-filling ``N`` copies of every trainable parameter.

    This is the memory that any ``grad_batch`` (``[N, *p.shape]`` per parameter) has to write.
    Like ``grad_batch`` attributes, each call's copies stay alive until the next call replaces them.
    """
    n = len(problem.inputs)
    shapes = [p.shape for p in problem.model.parameters() if p.requires_grad]
    kept: dict[int, Tensor] = {}

    def allocate() -> None:
        for i, shape in enumerate(shapes):
            kept[i] = torch.zeros(n, *shape)  # frees the previous call's copies of this parameter

    return _median_time(allocate, repeats)


def run_problem(
    problem: Problem, quantities: Sequence[Quantity], repeats: int = DEFAULT_REPEATS
) -> list[QuantityResult]:
    """Compute each quantity alone on ``problem``; see :class:`QuantityResult`.

    The norms come from one untimed backward pass with the RNG seeded by :data:`SEED`;
    the times from ``repeats`` further passes, each next to a plain pass (``T0``).
    """
    params = dict(problem.model.named_parameters())
    results = []
    for quantity in quantities:

        def with_quantity(q: Quantity = quantity) -> None:
            with secorder_hooks.extend(problem.model, q):
                problem.forward_backward()

        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                with_quantity()
            norms = {name: _norm(getattr(p, quantity.attribute), quantity) for name, p in params.items()}
            ratio, seconds = _median_ratio(with_quantity, problem.forward_backward, repeats)
        except (NotImplementedError, SecorderError) as err:
            results.append(QuantityResult(quantity, None, {}, f"{type(err).__name__}: {err}"))
            continue
        finally:
            secorder_hooks.clear_quantities(problem.model)
        results.append(QuantityResult(quantity, seconds, norms, ratio=ratio))
    return results


def format_table(problem: Problem, results: Sequence[QuantityResult]) -> str:
    """Rows: quantities; columns: time / T0 and the norm of the quantity per parameter."""
    params = dict(problem.model.named_parameters())
    header = ["quantity", "time/T0", *params]
    shapes = ["", "", *("x".join(map(str, p.shape)) for p in params.values())]
    rows = [header, shapes]
    for r in results:
        if r.ratio is None:
            rows.append([r.quantity.attribute, NOT_AVAILABLE, *([NOT_AVAILABLE] * len(params))])
        else:
            rows.append([r.quantity.attribute, f"{r.ratio:.3g}", *(f"{r.norms[n]:.3e}" for n in params)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(2, "-" * len(lines[0]))
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    """``argparse`` type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of ``python -m secorder_hooks``."""
    names = [type(q).__name__ for q in available_quantities()]
    parser = argparse.ArgumentParser(prog="python -m secorder_hooks", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"secorder_hooks {secorder_hooks.__version__}")
    parser.add_argument("--batch-size", type=_positive_int, default=64, help="examples per batch (default: 64)")
    parser.add_argument(
        "--repeats",
        type=_positive_int,
        default=DEFAULT_REPEATS,
        help=f"timed passes per quantity; the median is shown (default: {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--threads", type=_positive_int, default=1, help="torch threads (default: 1, robust to a busy machine)"
    )
    parser.add_argument(
        "--problems",
        nargs="+",
        choices=[p.value for p in ProblemName],
        default=[p.value for p in ProblemName],
        help="built-in problems to run (default: all)",
    )
    parser.add_argument(
        "--quantities", nargs="+", choices=names, default=names, metavar="QUANTITY", help=f"default: all of {names}"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print one table per problem; returns the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quantities = [q for q in available_quantities() if type(q).__name__ in args.quantities]
    threads = _plural(torch.get_num_threads(), "thread")
    print(f"secorder_hooks {secorder_hooks.__version__}, torch {torch.__version__}, {threads}")
    cores, load = os.cpu_count() or 1, os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > cores:
        print(f"The machine is busy (load average {load:.1f} on {_plural(cores, 'core')}): the times will scatter.")
    print("Each cell: Frobenius norm of the quantity for that parameter (attribute p.<quantity>).")
    print(
        "time/T0: one backward pass computing the quantity (including .grad) / a plain forward+backward"
        f" timed next to it, median of {_plural(args.repeats, 'pair')}"
        f" (each at least {MIN_MEASUREMENT_SECONDS * 1e3:.0f} ms of passes).\n"
    )
    unavailable: dict[str, str] = {}
    for problem in builtin_problems(args.batch_size, [ProblemName(p) for p in args.problems]):
        t0 = _median_time(problem.forward_backward, max(3 * args.repeats, 10))
        results = run_problem(problem, quantities, args.repeats)
        print(f"{problem.name}, N={args.batch_size}, T0 = {t0 * 1e3:.2f} ms")
        print(format_table(problem, results))
        if any(isinstance(r.quantity, secorder_hooks.BatchGrad) for r in results):
            alloc = allocation_seconds(problem, args.repeats)
            megabytes = sum(p.numel() * p.element_size() for p in problem.model.parameters()) * args.batch_size / 2**20
            print(
                f"Note: grad_batch writes N = {args.batch_size} copies of every parameter ({megabytes:.1f} MB):"
                f" allocating and zero-filling that memory alone (kept alive like the attribute) takes"
                f" {alloc / t0:.2g} x T0; its cost grows with N x the number of parameters."
            )
        print()
        unavailable.update({r.quantity.attribute: r.error for r in results if r.error is not None})
    for attribute, error in unavailable.items():
        print(f"{NOT_AVAILABLE} {attribute}: {error.splitlines()[0][:150]}")
    return 0
