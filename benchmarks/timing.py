r"""Interleaved timing: every method as a ratio ``time / T0`` measured in the same run.

The machine is noisy, so absolute times mean little. In each repetition every method
(the baseline ``T0`` = plain forward + loss + backward included) is timed once, in a fresh
random order; a method's ratio for that repetition is its time divided by the baseline's
time of the same repetition. We report the median and the interquartile range of these
ratios over the repetitions. One "time" is the mean over ``number`` back-to-back calls,
with ``number`` calibrated so that a measurement lasts at least ``min_time`` seconds.
"""

from __future__ import annotations

import gc
import math
import platform
import random
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "THREADS",
    "ALLOCATOR_WARMUP_BYTES",
    "Ratio",
    "setup_torch",
    "reset_parameters",
    "calibrate",
    "time_interleaved",
    "machine_description",
]

THREADS = 2
"""Torch intra-op threads for every benchmark (DESIGN.md sec. 4)."""

ALLOCATOR_WARMUP_BYTES = 16 * 2**20
"""Size of the buffer :func:`setup_torch` allocates and frees once before any timing.

glibc's ``malloc`` serves a request above its *mmap threshold* with fresh pages and trims
the heap whenever more than twice that threshold lies free at its top; both thresholds
start small (128 KiB) and rise to the size of the largest block that was mmapped and
freed (up to 32 MiB). A small benchmark process that never freed a large block therefore
trims and re-faults its heap in every step: on this machine 900 to 1450 page faults per
step for our quantities on problem A (+0.8 ms, ``T0`` 1.3 ms) against 22 for ``T0``, and
results depended on what ran before. Freeing one 16 MiB block moves the thresholds to
their steady state, as any training process that touches a larger tensor does; ``T0``
is unchanged by it, and every method is timed in the same conditions.
"""


@dataclass(frozen=True)
class Ratio:
    """Summary of ``time / T0`` over repetitions.

    Attributes:
        median: Median ratio.
        q1: First quartile.
        q3: Third quartile.
        seconds: Median absolute time of one call of the method.
    """

    median: float
    q1: float
    q3: float
    seconds: float

    def __str__(self) -> str:
        return f"{_fmt(self.median)} [{_fmt(self.q1)}, {_fmt(self.q3)}]"


def _fmt(value: float) -> str:
    """Three significant digits, no exponent below 1000 (``0.0123``, ``1.23``, ``123``)."""
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def setup_torch(threads: int = THREADS, seed: int = 0) -> None:
    """Fix the torch thread count and the global seed, and bring ``malloc`` to its steady state.

    See :data:`ALLOCATOR_WARMUP_BYTES` (float32 is the problems' default).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    block = torch.empty(ALLOCATOR_WARMUP_BYTES, dtype=torch.uint8)
    del block


def reset_parameters(model: nn.Module, attributes: Iterable[str] = ()) -> None:
    """Set ``p.grad = None`` and delete ``attributes`` from every parameter of ``model``."""
    attributes = tuple(attributes)
    for p in model.parameters():
        p.grad = None
        for attribute in attributes:
            if hasattr(p, attribute):
                delattr(p, attribute)


def _time_once(fn: Callable[[], object], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def calibrate(fn: Callable[[], object], min_time: float) -> int:
    """Calls per measurement so that one measurement takes at least ``min_time`` seconds.

    Runs ``fn`` twice (the first call is a warm-up).
    """
    fn()
    seconds = _time_once(fn, 1)
    return max(1, math.ceil(min_time / max(seconds, 1e-9)))


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def time_interleaved(
    methods: Mapping[str, Callable[[], object]],
    baseline: str,
    reps: int = 10,
    min_time: float = 0.05,
    seed: int = 0,
    cleanups: Mapping[str, Callable[[], object]] | None = None,
) -> dict[str, Ratio]:
    """Time ``methods`` interleaved and return ``time / time(baseline)`` per method.

    Args:
        methods: Name -> callable doing one complete step (cleanup, forward, loss, backward).
            Every callable must already have run successfully once.
        baseline: Key of the ``T0`` method in ``methods``.
        reps: Number of repetitions (each times every method once).
        min_time: Minimum duration of one measurement in seconds.
        seed: Seed of the random order within repetitions.
        cleanups: Name -> callable run (untimed) after each measurement of that method, to
            free its results before the next method runs.

    Returns:
        Name -> :class:`Ratio` (the baseline's own ratio is 1).
    """
    if baseline not in methods:
        raise KeyError(f"baseline {baseline!r} is not among the methods {list(methods)}")
    cleanups = cleanups or {}

    def cleanup(name: str) -> None:
        if name in cleanups:
            cleanups[name]()

    numbers = {}
    for name, fn in methods.items():
        numbers[name] = calibrate(fn, min_time)
        cleanup(name)
    order = list(methods)
    rng = random.Random(seed)
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            rng.shuffle(order)
            for name in order:
                seconds[name].append(_time_once(methods[name], numbers[name]))
                cleanup(name)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    results = {}
    for name, times in seconds.items():
        ratios = [t / t0 for t, t0 in zip(times, seconds[baseline])]
        q1, median, q3 = _quartiles(ratios)
        results[name] = Ratio(median=median, q1=q1, q3=q3, seconds=statistics.median(times))
    return results


def machine_description() -> str:
    """One line: CPU, core count, torch threads, versions and the load average (noise indicator)."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}, load average {load}"
    )
