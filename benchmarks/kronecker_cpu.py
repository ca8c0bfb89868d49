"""CPU time per step of T0 and the Kronecker quantities (ours, BackPACK, curvlinops) on problems A and B.

Usage (from ``benchmarks/``): ``python kronecker_cpu.py [reps]``.

``time.process_time`` per step, one torch thread, steps interleaved: on a machine shared by
many processes (load average far above the core count) the wall-clock ratios of
``compare.py`` swing by a factor 2 between runs, while the CPU time of this process does
not count the time it waits for a core. Prints median ``[q1, q3]`` of time / T0, and the
ratio of our median to BackPACK's for each quantity.
"""

import statistics
import sys
import time
import warnings

import torch

warnings.simplefilter("ignore")
from ours import OurQuantity, plain_step  # noqa: E402
from peers import Peer, methods_for  # noqa: E402
from problems import ProblemName, make_problem  # noqa: E402

torch.set_num_threads(1)
torch.manual_seed(0)
reps = int(sys.argv[1]) if len(sys.argv) > 1 else 15
for name in (ProblemName("A"), ProblemName("B")):
    steps = {"T0": plain_step(make_problem(name))}
    for m in methods_for([Peer.OURS, Peer.BACKPACK, Peer.CURVLINOPS], [OurQuantity.KFLR, OurQuantity.KFAC]):
        built = m.build(make_problem(name))
        built.step()
        steps[m.key] = built.step
    times = {k: [] for k in steps}
    for _ in range(reps):
        for k, step in steps.items():
            t = time.process_time()
            step()
            times[k].append(time.process_time() - t)
    t0 = statistics.median(times["T0"])
    print(f"problem {name.value}: T0 = {t0 * 1e3:.2f} ms CPU")
    for k, v in times.items():
        q1, q3 = sorted(v)[len(v) // 4] / t0, sorted(v)[3 * len(v) // 4] / t0
        print(f"  {k:24s} {statistics.median(v) / t0:6.2f}  [{q1:.2f}, {q3:.2f}]")
    for q in (OurQuantity.KFLR, OurQuantity.KFAC):
        ours, backpack = (times.get(f"{peer.value}:{q.value}") for peer in (Peer.OURS, Peer.BACKPACK))
        if ours and backpack:
            print(f"  ours / BackPACK, {q.value}: {statistics.median(ours) / statistics.median(backpack):.2f}")
