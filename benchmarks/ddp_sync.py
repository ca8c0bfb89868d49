"""Cost of synchronizing quantities under DistributedDataParallel, as time / T0.

Run: ``torchrun --nproc_per_node 2 benchmarks/ddp_sync.py [--problem A] [--repeats 15]``
(gloo on CPU, one thread per process). T0 is one DDP step (forward, loss, backward with
DDP's gradient all-reduce) on each process's batch of the problem; every method runs in
the same repetition, in an order shuffled identically on every process (collectives must
match), and its ratio is its time over T0 of that repetition. Rank 0 prints the median and
the interquartile range. ``all-reduce P`` times one all-reduce of as many float32 numbers
as the model has parameters (the volume of one synchronized diagonal).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import secorder_hooks as sh
from benchmarks.problems import make_problem, num_params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problem", default="A")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    problem = make_problem(args.problem, seed=rank)  # same model after DDP's broadcast, own batch
    ddp = DistributedDataParallel(problem.model)
    x, y, loss_fn = problem.inputs, problem.targets, problem.loss_fn
    buffer = torch.zeros(num_params(problem.model))

    def step(*quantities: sh.Quantity, sync: bool | None = None) -> Callable[[], None]:
        def run() -> None:
            ddp.zero_grad(set_to_none=True)
            if not quantities:
                loss_fn(ddp(x), y).backward()
                return
            with sh.extend(ddp, *quantities, sync=sync):
                loss_fn(ddp(x), y).backward()

        return run

    methods: dict[str, Callable[[], None]] = {
        "T0": step(),
        "all-reduce P": lambda: dist.all_reduce(buffer),
        "SumGradSquared, per process": step(sh.SumGradSquared(), sync=False),
        "SumGradSquared, synchronized": step(sh.SumGradSquared()),
        "Variance, synchronized": step(sh.Variance()),
        "DiagGGNExact, per process": step(sh.DiagGGNExact(), sync=False),
        "DiagGGNExact, synchronized": step(sh.DiagGGNExact()),
        "BatchGrad, per process": step(sh.BatchGrad(), sync=False),
        "BatchGrad, synchronized": step(sh.BatchGrad()),
    }
    for run in methods.values():  # warm-up
        run()
    order = random.Random(0)  # the same order in every process
    ratios: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.repeats):
        names = list(methods)
        order.shuffle(names)
        times = {}
        for name in names:
            dist.barrier()
            start = time.perf_counter()
            methods[name]()
            times[name] = time.perf_counter() - start
        for name in methods:
            ratios[name].append(times[name] / times["T0"])
    if rank == 0:
        world = dist.get_world_size()
        print(f"problem {args.problem}, {world} processes (gloo, CPU, 1 thread each), {args.repeats} repetitions")
        print(f"{'method':32s} {'time / T0':>10s}  interquartile range")
        for name, values in ratios.items():
            q = statistics.quantiles(values, n=4)
            print(f"{name:32s} {statistics.median(values):10.2f}  {q[0]:.2f} - {q[2]:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
