"""Benchmarks of the function API (issue 4).

* ``model_hessian_diagonal`` on the standard problems A, B, C next to the engine's raw
  ``DiagHessian`` step (forward + loss + backward inside ``extend``): the function should
  stay within 1.2x of it.
* ``hessian_diagonal`` (generic, vectorized) on a ~5,000-parameter MLP next to one
  double backward per element, measured on a subset of elements and extrapolated; the
  vectorized path should be at least 50x faster.

``pytest benchmarks/`` runs the pytest-benchmark cases; ``python benchmarks/test_function_api_bench.py``
prints the two ratios, measured in one run (never asserted: timings are not tests).
"""

from __future__ import annotations

import time

import pytest
import torch
from problems import STANDARD, Problem, make_problem
from timing import setup_torch
from torch import nn

from secorder_hooks import DiagHessian, extend, hessian_diagonal, model_hessian_diagonal
from secorder_hooks.core import Backend, use_backend

BASELINE_ELEMENTS = 200
"""Elements of the per-element baseline actually timed (the rest is extrapolated)."""


@pytest.fixture(params=STANDARD, ids=lambda p: p.value)
def problem(request: pytest.FixtureRequest) -> Problem:
    setup_torch()
    return make_problem(request.param)


def _engine_step(problem: Problem):
    def step() -> None:
        problem.model.zero_grad()  # each step one batch (quantities accumulate like .grad)
        with extend(problem.model, DiagHessian()):
            problem.loss().backward()

    return step


def _function_step(problem: Problem):
    def step() -> list[torch.Tensor]:
        with use_backend(Backend.ENGINE):  # never time the generic fallback by accident
            return model_hessian_diagonal(problem.model, problem.loss_fn, problem.inputs, problem.targets)

    return step


def test_engine_diag_hessian(benchmark, problem: Problem) -> None:
    benchmark.pedantic(_engine_step(problem), rounds=5, warmup_rounds=1)


def test_model_hessian_diagonal(benchmark, problem: Problem) -> None:
    diag = benchmark.pedantic(_function_step(problem), rounds=5, warmup_rounds=1)
    _engine_step(problem)()
    for d, p in zip(diag, problem.model.parameters()):
        torch.testing.assert_close(d, p.diag_h, rtol=1e-5, atol=1e-8)


def _best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def model_hessian_diagonal_overhead(problem: Problem) -> float:
    """Same-run ratio function / engine step, interleaved, best of 7 each (target <= 1.2)."""
    engine, function = _engine_step(problem), _function_step(problem)
    best = {engine: float("inf"), function: float("inf")}
    for _ in range(7):
        for fn in (engine, function):
            start = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - start)
    ratio = best[function] / best[engine]
    return ratio


# ----------------------------------------------------------------------------- generic path
def _mlp5000() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 40), nn.Tanh(), nn.Linear(40, 10))
    return model, torch.randn(32, 32), torch.randint(0, 10, (32,))


def _per_element(model: nn.Module, x: torch.Tensor, y: torch.Tensor, elements: int) -> float:
    """Seconds for ``elements`` double backward passes, one per Hessian diagonal element."""
    params = list(model.parameters())
    start = time.perf_counter()
    grads = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
    done = 0
    for p, g in zip(params, grads):
        flat = g.reshape(-1)
        for j in range(min(flat.numel(), elements - done)):
            (row,) = torch.autograd.grad(flat[j], p, retain_graph=True)
            _ = row.reshape(-1)[j]
            done += 1
        if done >= elements:
            break
    return time.perf_counter() - start


def _vectorized(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    params = list(model.parameters())
    return lambda: hessian_diagonal(lambda: nn.functional.cross_entropy(model(x), y), params)


def test_hessian_diagonal_mlp5000(benchmark) -> None:
    setup_torch()
    model, x, y = _mlp5000()
    benchmark.extra_info["params"] = sum(p.numel() for p in model.parameters())
    benchmark.pedantic(_vectorized(model, x, y), rounds=3, warmup_rounds=1)


def test_per_element_baseline_mlp5000(benchmark) -> None:
    """One double backward per element on a subset; ``extra_info`` holds the extrapolation."""
    setup_torch()
    model, x, y = _mlp5000()
    total = sum(p.numel() for p in model.parameters())
    seconds = benchmark.pedantic(lambda: _per_element(model, x, y, BASELINE_ELEMENTS), rounds=3)
    benchmark.extra_info["elements_timed"] = BASELINE_ELEMENTS
    benchmark.extra_info["params"] = total
    benchmark.extra_info["extrapolated_full_s"] = seconds * total / BASELINE_ELEMENTS


def hessian_diagonal_speedup() -> tuple[int, float, float]:
    """Same run: (parameters, vectorized seconds, extrapolated per-element seconds); target ratio >= 50."""
    setup_torch()
    model, x, y = _mlp5000()
    total = sum(p.numel() for p in model.parameters())
    vectorized = _best_of(_vectorized(model, x, y), repeats=3)
    baseline = min(_per_element(model, x, y, BASELINE_ELEMENTS) for _ in range(3)) * total / BASELINE_ELEMENTS
    return total, vectorized, baseline


def main() -> None:
    """Print the two ratios the function-API issue targets (measured, never asserted)."""
    setup_torch()
    for name in STANDARD:
        ratio = model_hessian_diagonal_overhead(make_problem(name))
        print(f"model_hessian_diagonal / engine DiagHessian on {name.value}: {ratio:.2f} (target <= 1.2)")
    total, vectorized, baseline = hessian_diagonal_speedup()
    print(
        f"hessian_diagonal on an MLP with {total} parameters: {vectorized:.3f} s; one double backward per element: "
        f"{baseline:.1f} s (extrapolated); speed-up {baseline / vectorized:.0f}x (target >= 50)"
    )


if __name__ == "__main__":
    main()
