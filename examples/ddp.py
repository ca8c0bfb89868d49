"""Exact quantities of the global batch under DistributedDataParallel.

Run with ``torchrun --nproc_per_node 2 examples/ddp.py`` (add ``--check`` to compare, on
rank 0, with one process computing on the whole batch). Every process takes its own,
unequal, shard of one global batch; inside ``extend`` each backward pass leaves on every
process the quantities of the whole batch.
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import secorder_hooks as sh


def main() -> None:
    """Train step on this process's shard; with --check, compare with one process on the whole batch."""
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same model and global batch in every process
    model = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(13, 10), torch.randint(0, 3, (13,))
    mine = torch.tensor_split(torch.arange(len(x)), world)[rank]  # 7 and 6 examples for 2 processes
    single_process = copy.deepcopy(model)

    ddp = DistributedDataParallel(model)
    with sh.extend(ddp, sh.SumGradSquared(), sh.DiagGGNExact(), sh.BatchGrad()):  # synchronized: DDP detected
        loss = nn.functional.cross_entropy(ddp(x[mine]), y[mine])
        loss.backward()

    weight = ddp.module[0].weight
    print(
        f"rank {rank}: {len(mine)} examples, grad_batch {tuple(weight.grad_batch.shape)}, "
        f"diag_ggn_exact sum {weight.diag_ggn_exact.sum().item():.6f}"
    )

    if "--check" in sys.argv and rank == 0:
        with sh.extend(single_process, sh.SumGradSquared(), sh.DiagGGNExact(), sh.BatchGrad()):
            nn.functional.cross_entropy(single_process(x), y).backward()
        for p, q in zip(ddp.module.parameters(), single_process.parameters()):
            torch.testing.assert_close(p.sum_grad_squared, q.sum_grad_squared)  # the whole batch's
            torch.testing.assert_close(p.diag_ggn_exact, q.diag_ggn_exact)
            torch.testing.assert_close(p.grad_batch, q.grad_batch[mine])  # this process's rows of it
        print("rank 0: the quantities equal those of one process on the whole batch")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
