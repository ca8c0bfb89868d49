"""The processes of the data-parallel tests (tests/test_distributed.py), spawned by the test.

Each rank joins a gloo group on 127.0.0.1, takes its (unequal) shard of one global batch,
computes every quantity under ``DistributedDataParallel`` and saves what it got; the test
compares with single-process references on the full batch. Kept free of pytest so that
spawned processes import it quickly.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

import secorder_hooks as sh
from tests.support import zoo

CASES = ("mlp_tanh", "cnn", "mlp_sigmoid")  # cross-entropy MLP, cross-entropy CNN, MSE MLP (c = 1/(N C))
SHARDS = (3, 5)  # unequal shards of a global batch of 8
MC_SAMPLES = 3
ALL = (
    sh.BatchGrad(),
    sh.SumGradSquared(),
    sh.BatchL2Grad(),
    sh.Variance(),
    sh.DiagGGNExact(),
    sh.BatchDiagGGNExact(),
    sh.DiagHessian(),
    sh.BatchDiagHessian(),
)


def global_batch(name: str, seed: int = 1) -> tuple[nn.Module, Tensor, Tensor, zoo.Case]:
    """The model (float64) and a global batch of ``sum(SHARDS)`` examples of a zoo case, seeded."""
    case = zoo.make(name, torch.float64, seed=0)
    gen = torch.Generator().manual_seed(seed)
    n = sum(SHARDS)
    x = torch.randn(n, *case.x.shape[1:], dtype=torch.float64, generator=gen)
    if case.y.is_floating_point():
        with torch.no_grad():
            y = torch.randn(case.model(x).shape, dtype=torch.float64, generator=gen)
    else:
        y = torch.randint(0, 3, (n,), generator=gen)
    return case.model, x, y, case


def shard(rank: int, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    start = sum(SHARDS[:rank])
    return x[start : start + SHARDS[rank]], y[start : start + SHARDS[rank]]


def mc_generator(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(100 + rank)


class Gated(nn.Module):
    """``tanh(a(x)) + m * sigmoid(b(x))`` with ``m_n = [x_n0 > 0]``; ``b`` is not called on a batch without any."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.tanh(self.a(x))
        mask = (x[:, :1] > 0).to(x.dtype)
        if not mask.any():
            return out
        return out + mask * torch.sigmoid(self.b(x))


GATED_SUMMED = (sh.SumGradSquared(), sh.Variance(), sh.DiagGGNExact(), sh.DiagHessian())


def gated_batch() -> tuple[nn.Module, Tensor, Tensor]:
    """A global batch whose first shard has no example that uses ``b`` and whose second has two."""
    torch.manual_seed(0)
    model = Gated().double()
    x = torch.randn(sum(SHARDS), 4, dtype=torch.float64)
    x[:, 0] = -x[:, 0].abs()
    x[SHARDS[0], 0] = x[SHARDS[0] + 1, 0] = 1.0
    return model, x, torch.randint(0, 3, (sum(SHARDS),))


def _attributes(model: nn.Module, quantities) -> dict[str, dict[str, Tensor]]:
    out = {}
    for name, p in model.named_parameters():
        values = {q.attribute: getattr(p, q.attribute).detach().clone() for q in quantities if hasattr(p, q.attribute)}
        if p.grad is not None:
            values["grad"] = p.grad.detach().clone()
        out[name.removeprefix("module.")] = values
    return out


def run(rank: int, world: int, port: int, out_dir: str, cases: tuple[tuple[str, str], ...], everything: bool) -> None:
    """One rank: each ``(case, reduction)`` under DDP (synchronized and not) and the function API.

    With ``everything``, also a model with a parameter that one shard does not reach.
    """
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback device: nothing leaves the machine
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        results = {}
        for name, reduction in cases:
            results.update(_case(rank, name, reduction))
        if everything:
            model, x, y = gated_batch()
            xr, yr = shard(rank, x, y)
            ddp = DistributedDataParallel(model, find_unused_parameters=True)
            with sh.extend(ddp, *GATED_SUMMED):
                nn.functional.cross_entropy(ddp(xr), yr).backward()
            results["gated"] = _attributes(ddp, GATED_SUMMED)
            ddp.zero_grad(set_to_none=True)
            with sh.extend(ddp, sh.KFLR()):  # rank 0 has no factors of b: the layout comes from rank 1
                nn.functional.cross_entropy(ddp(xr), yr).backward()
            results["gated_kflr"] = _factors(ddp, (sh.KFLR(),))
            results["accumulated"] = _accumulated(rank)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


ACCUMULATED = (sh.SumGradSquared(), sh.DiagGGNExact(), sh.BatchGrad())


def _accumulated(rank: int) -> dict[str, object]:
    """Two micro-batches (this rank's shards of global batches 1 and 2) accumulated under DDP; Variance refuses."""
    model, *_, case = global_batch("mlp_tanh")
    batches = [shard(rank, *global_batch("mlp_tanh", seed)[1:3]) for seed in (1, 2)]
    ddp = DistributedDataParallel(model)
    with sh.extend(ddp, *ACCUMULATED):
        for xr, yr in batches:
            case.loss_fn("mean")(ddp(xr), yr).backward()
    out: dict[str, object] = _attributes(ddp, ACCUMULATED)
    ddp.zero_grad(set_to_none=True)
    out["variance_error"] = ""
    try:
        with sh.extend(ddp, sh.Variance()):
            for xr, yr in batches:
                case.loss_fn("mean")(ddp(xr), yr).backward()
    except sh.ExtensionError as err:
        out["variance_error"] = str(err)
    return out


def _case(rank: int, name: str, reduction: str) -> dict[str, object]:
    model, x, y, case = global_batch(name)
    xr, yr = shard(rank, x, y)
    loss_fn = case.loss_fn(reduction)
    key = f"{name}/{reduction}"
    results: dict[str, object] = {}

    ddp = DistributedDataParallel(model)
    quantities = (*ALL, sh.DiagGGNMC(MC_SAMPLES, mc_generator(rank)))
    with sh.extend(ddp, *quantities):  # synchronized: detected from DDP
        loss_fn(ddp(xr), yr).backward()
    results[f"{key}/ddp"] = _attributes(ddp, quantities)

    ddp.zero_grad(set_to_none=True)
    with sh.extend(ddp, *ALL, sync=False):  # per process
        loss_fn(ddp(xr), yr).backward()
    results[f"{key}/local"] = _attributes(ddp, ALL)

    # any model with sync=True over the default group; the loss divided by a constant
    model.zero_grad(set_to_none=True)
    manual = (sh.SumGradSquared(), sh.DiagGGNExact())
    with sh.extend(model, *manual, sync=True):
        (loss_fn(model(xr), yr) / 4).backward()
    results[f"{key}/manual"] = _attributes(model, manual)

    results[f"{key}/kronecker"] = _kronecker(rank, ddp, case, xr, yr, reduction)

    loss_type = "mse" if case.y.is_floating_point() else "nll"
    results[f"{key}/api"] = {
        "hessian": sh.model_hessian_diagonal(ddp, loss_fn, xr, yr),  # synchronized: detected from DDP
        "empirical": sh.empirical_fisher_diagonal(model, loss_fn, xr, yr, sync=True),
        "ggn": sh.generalized_fisher_diagonal(model, model(xr), yr, loss_type, reduction=reduction, sync=True),
        "empirical_trace": sh.empirical_fisher_trace(model, loss_fn, xr, yr, sync=True),
        "per_layer": sh.per_layer_hessian_diagonal(ddp, loss_fn, xr, yr),
    }
    return results


def kronecker_quantities(rank: int) -> tuple[sh.KroneckerQuantity, ...]:
    """KFLR, KFAC (this rank's generator) and KFACEmpirical with the bias folded into the input factor."""
    kfac = sh.KFAC(mc_samples=MC_SAMPLES, generator=mc_generator(rank))
    return (sh.KFLR(), kfac, sh.KFACEmpirical(separate_weight_and_bias=False))


def _factors(model: nn.Module, quantities) -> dict[str, dict[str, list[Tensor]]]:
    out = {}
    for name, p in model.named_parameters():
        present = [q.attribute for q in quantities if hasattr(p, q.attribute)]
        out[name.removeprefix("module.")] = {a: [f.clone() for f in getattr(p, a)] for a in present}
    return out


def _kronecker(rank: int, ddp: nn.Module, case: zoo.Case, xr: Tensor, yr: Tensor, reduction: str) -> dict[str, object]:
    """The Kronecker factors under DDP; EK-FAC and an accumulation of two passes refuse (their errors)."""
    loss_fn = case.loss_fn(reduction)
    quantities = kronecker_quantities(rank)
    ddp.zero_grad(set_to_none=True)
    with sh.extend(ddp, *quantities):
        loss_fn(ddp(xr), yr).backward()
    out: dict[str, object] = {"factors": _factors(ddp, quantities)}
    for label, quantity, passes in (("ekfac_error", sh.EKFAC(), 1), ("accumulation_error", sh.KFLR(), 2)):
        ddp.zero_grad(set_to_none=True)
        out[label] = ""
        try:
            with sh.extend(ddp, quantity):
                for _ in range(passes):
                    loss_fn(ddp(xr), yr).backward()
        except sh.ExtensionError as err:
            out[label] = str(err)
    ddp.zero_grad(set_to_none=True)
    return out
