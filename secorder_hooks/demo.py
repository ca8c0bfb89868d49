"""A tour of the library on two small built-in problems: ``python -m secorder_hooks``.

For each problem (a tanh MLP with MSE loss, a small CNN with cross-entropy, both on
synthetic data) the demo computes every quantity of :mod:`secorder_hooks.quantities`
inside :func:`secorder_hooks.extend`, prints the Frobenius norm of each quantity per
parameter, and the time each quantity took relative to ``T0``, one plain
forward + loss + backward pass of the same problem. A quantity the installed version
cannot compute (it raises ``NotImplementedError`` or a :class:`~secorder_hooks.SecorderError`)
is shown as ``n/a``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import secorder_hooks
from secorder_hooks.errors import SecorderError
from secorder_hooks.quantities import Quantity

__all__ = ["Problem", "QuantityResult", "available_quantities", "builtin_problems", "main", "run_problem"]

NOT_AVAILABLE = "n/a"


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
        seconds: Shortest wall time of one backward pass computing it, ``None`` if n/a.
        norms: Frobenius norm of the quantity per parameter name (empty if n/a).
        error: Why the quantity is not available, ``None`` if it is.
    """

    quantity: Quantity
    seconds: float | None
    norms: dict[str, float]
    error: str | None = None


def available_quantities() -> list[Quantity]:
    """One default instance of every quantity class the package exports."""
    classes = [getattr(secorder_hooks, name) for name in secorder_hooks.__all__]
    return [cls() for cls in classes if isinstance(cls, type) and issubclass(cls, Quantity) and cls is not Quantity]


def builtin_problems(batch_size: int = 64) -> list[Problem]:
    """A tanh MLP (MSE, mean) and a small CNN (cross-entropy, mean) on synthetic data."""
    mlp = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))
    cnn = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 8 * 8, 10),
    )
    return [
        Problem(
            "MLP 64-128-64-10, tanh, MSELoss(mean)",
            mlp,
            torch.randn(batch_size, 64),
            torch.randn(batch_size, 10),
            nn.MSELoss(),
        ),
        Problem(
            "CNN 3x16x16, conv-relu-pool-linear, CrossEntropyLoss(mean)",
            cnn,
            torch.randn(batch_size, 3, 16, 16),
            torch.randint(0, 10, (batch_size,)),
            nn.CrossEntropyLoss(),
        ),
    ]


def _best_time(fn: Callable[[], None], repeats: int) -> float:
    """Shortest wall time of ``fn()`` over ``repeats`` calls after one warm-up call.

    The minimum, not the mean, because noise on a shared machine only adds time.
    """
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def run_problem(problem: Problem, quantities: Sequence[Quantity], repeats: int = 3) -> list[QuantityResult]:
    """Compute each quantity alone on ``problem``; see :class:`QuantityResult`."""
    params = dict(problem.model.named_parameters())
    results = []
    for quantity in quantities:

        def with_quantity(q: Quantity = quantity) -> None:
            with secorder_hooks.extend(problem.model, q):
                problem.forward_backward()

        try:
            seconds = _best_time(with_quantity, repeats)
        except (NotImplementedError, SecorderError) as err:
            results.append(QuantityResult(quantity, None, {}, f"{type(err).__name__}: {err}"))
            continue
        norms = {name: getattr(p, quantity.attribute).norm().item() for name, p in params.items()}
        secorder_hooks.clear_quantities(problem.model)
        results.append(QuantityResult(quantity, seconds, norms))
    return results


def format_table(problem: Problem, results: Sequence[QuantityResult], t0: float) -> str:
    """Rows: quantities; columns: time / T0 and the norm of the quantity per parameter."""
    params = dict(problem.model.named_parameters())
    header = ["quantity", "time/T0", *params]
    shapes = ["", "", *("x".join(map(str, p.shape)) for p in params.values())]
    rows = [header, shapes]
    for r in results:
        if r.seconds is None:
            rows.append([r.quantity.attribute, NOT_AVAILABLE, *([NOT_AVAILABLE] * len(params))])
        else:
            rows.append([r.quantity.attribute, f"{r.seconds / t0:.3g}", *(f"{r.norms[n]:.3e}" for n in params)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in rows
    ]
    lines.insert(2, "-" * len(lines[0]))
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo and print one table per problem; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m secorder_hooks", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="examples per batch (default: 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per quantity (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1, robust to a busy machine)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    quantities = available_quantities()
    print(f"secorder_hooks {secorder_hooks.__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("Each cell: Frobenius norm of the quantity for that parameter (attribute p.<quantity>).")
    print("time/T0: one backward pass computing the quantity (including .grad) / a plain forward+backward.\n")
    unavailable: dict[str, str] = {}
    for problem in builtin_problems(args.batch_size):
        t0 = _best_time(problem.forward_backward, max(3 * args.repeats, 10))
        results = run_problem(problem, quantities, args.repeats)
        print(f"{problem.name}, N={args.batch_size}, T0 = {t0 * 1e3:.2f} ms")
        print(format_table(problem, results, t0), end="\n\n")
        unavailable.update({r.quantity.attribute: r.error for r in results if r.error is not None})
    for attribute, error in unavailable.items():
        print(f"{NOT_AVAILABLE} {attribute}: {error.splitlines()[0][:150]}")
    return 0
