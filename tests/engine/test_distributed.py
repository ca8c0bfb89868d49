"""Data-parallel: 2 gloo ranks on 127.0.0.1 with unequal shards against the full batch in one process.

The test spawns the ranks itself (``torch.multiprocessing``, a free port, a deadline after
which they are killed), and compares what every rank holds with independent brute-force
references (``tests/reference.py``) on the concatenated batch, in float64:

* every summed quantity equals the full-batch value, for both reductions;
* per-example quantities are this rank's rows of the full-batch ones;
* ``.grad`` is what DDP gives: the average over ranks of the ranks' gradients (which,
  with unequal shards and a mean loss, is *not* the full-batch gradient);
* ``sync=False`` keeps every quantity of the rank's shard;
* the function API synchronizes its results the same way.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import Tensor

import secorder_hooks as sh
from tests.support import ddp_worker as worker
from tests.support import reference

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

ROOT = Path(__file__).resolve().parents[2]
WORLD = len(worker.SHARDS)
DEADLINE_S = 240
TOL = {"atol": 1e-11, "rtol": 1e-9}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, nprocs: int = WORLD, deadline_s: float = DEADLINE_S) -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` spawned processes; kill them all past the deadline."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    end = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=max(0.0, end - time.monotonic())):
            if time.monotonic() >= end:
                pytest.fail(f"the {nprocs} ranks did not finish within {deadline_s} s (a hang?); killed them")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)


def run_ranks(out: Path, cases: list[tuple[str, str]], everything: bool) -> list[dict]:
    spawn(worker.run, WORLD, free_port(), str(out), tuple(cases), everything)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@functools.cache
def full_batch_references(name: str, reduction: str, seed: int = 1) -> dict[str, dict[str, Tensor]]:
    """Brute-force values on the concatenated batch, in one process."""
    model, x, y, case = worker.global_batch(name, seed)
    loss_fn = case.loss_fn(reduction)
    pe = reference.per_example_grads(model, loss_fn, x, y)
    ggn = reference.ggn_diagonal(model, loss_fn, x, y)
    ggn_pe = reference.ggn_diagonal(model, loss_fn, x, y, per_example=True)
    hess = reference.hessian_diagonal(model, loss_fn, x, y)
    hess_pe = reference.per_example_hessian_diagonal(model, loss_fn, x, y)
    return {
        k: {
            "grad_batch": g,
            "sum_grad_squared": g.square().sum(0),
            "batch_l2": g.flatten(1).square().sum(1),
            "variance": g.var(0, unbiased=False),
            "diag_ggn_exact": ggn[k],
            "diag_ggn_exact_batch": ggn_pe[k],
            "diag_h": hess[k],
            "diag_h_batch": hess_pe[k],
            "full_grad": g.sum(0),
        }
        for k, g in pe.items()
    }


def shard_values(name: str, reduction: str, rank: int, quantities) -> dict[str, dict[str, Tensor]]:
    """What one process computes on its shard alone (no distribution involved)."""
    model, x, y, case = worker.global_batch(name)
    xr, yr = worker.shard(rank, x, y)
    with sh.extend(model, *quantities):
        case.loss_fn(reduction)(model(xr), yr).backward()
    return {
        k: {q.attribute: getattr(p, q.attribute) for q in quantities} | {"grad": p.grad}
        for k, p in model.named_parameters()
    }


def shard_weight(name: str, reduction: str, rank: int) -> float:
    """c / c_r: the rank's share of the mean's terms (1 for a sum)."""
    if reduction == "sum":
        return 1.0
    _, x, y, case = worker.global_batch(name)
    per_example = 1 if not case.y.is_floating_point() else y[0].numel()  # MSE averages over N * C
    return worker.SHARDS[rank] * per_example / (x.shape[0] * per_example)


CASES = [(name, reduction) for name in worker.CASES for reduction in ("mean", "sum")]
QUICK = [("mlp_tanh", "mean")]
SUMMED = ("sum_grad_squared", "variance", "diag_ggn_exact", "diag_h")
ROWS = ("grad_batch", "batch_l2", "diag_ggn_exact_batch", "diag_h_batch")


def check_ddp_quantities_equal_the_full_batch(ranks: list[dict], name: str, reduction: str) -> None:
    expected = full_batch_references(name, reduction)
    starts = [sum(worker.SHARDS[:r]) for r in range(WORLD)]
    for rank, results in enumerate(ranks):
        got = results[f"{name}/{reduction}/ddp"]
        rows = slice(starts[rank], starts[rank] + worker.SHARDS[rank])
        for param, values in expected.items():
            for attribute in SUMMED:
                torch.testing.assert_close(
                    got[param][attribute], values[attribute], **TOL, msg=f"rank {rank} {param}.{attribute}"
                )
            for attribute in ROWS:
                torch.testing.assert_close(
                    got[param][attribute], values[attribute][rows], **TOL, msg=f"rank {rank} {param}.{attribute}"
                )


def check_ddp_grad_is_the_average_of_the_ranks(ranks: list[dict], name: str, reduction: str) -> None:
    """DDP averages over ranks: with unequal shards that is not the full batch's gradient (documented)."""
    local = [shard_values(name, reduction, r, (sh.BatchGrad(),)) for r in range(WORLD)]
    expected = full_batch_references(name, reduction)
    for rank, results in enumerate(ranks):
        got = results[f"{name}/{reduction}/ddp"]
        for param in expected:
            average = sum(local[r][param]["grad"] for r in range(WORLD)) / WORLD
            torch.testing.assert_close(got[param]["grad"], average, **TOL, msg=f"rank {rank} {param}.grad")
        # the rows of all ranks sum to the full batch's gradient, which DDP's .grad is not
        for param, values in expected.items():
            rows = torch.cat([r[f"{name}/{reduction}/ddp"][param]["grad_batch"] for r in ranks])
            torch.testing.assert_close(rows.sum(0), values["full_grad"], **TOL)
        first = next(iter(expected))
        assert not torch.allclose(got[first]["grad"], expected[first]["full_grad"]), "shards must make a difference"


def check_ddp_monte_carlo_is_the_weighted_sum_of_the_shards(ranks: list[dict], name: str, reduction: str) -> None:
    """Same draws as one process on each shard (same generators), combined with the weights c / c_r."""
    shards = []
    for r in range(WORLD):
        shards.append(shard_values(name, reduction, r, (sh.DiagGGNMC(worker.MC_SAMPLES, worker.mc_generator(r)),)))
    for rank, results in enumerate(ranks):
        got = results[f"{name}/{reduction}/ddp"]
        for param in got:
            expected = sum(shard_weight(name, reduction, r) * shards[r][param]["diag_ggn_mc"] for r in range(WORLD))
            torch.testing.assert_close(got[param]["diag_ggn_mc"], expected, **TOL, msg=f"rank {rank} {param}")


def check_sync_false_keeps_the_shard(ranks: list[dict], name: str, reduction: str) -> None:
    for rank, results in enumerate(ranks):
        local = shard_values(name, reduction, rank, worker.ALL)
        got = results[f"{name}/{reduction}/local"]
        for param, values in local.items():
            for q in worker.ALL:
                torch.testing.assert_close(
                    got[param][q.attribute], values[q.attribute], **TOL, msg=f"rank {rank} {param}.{q.attribute}"
                )


def check_sync_true_on_a_plain_model_with_a_scaled_loss(ranks: list[dict], name: str, reduction: str) -> None:
    """``sync=True`` without DDP (gradients all-reduced by the user), loss divided by a constant."""
    expected = full_batch_references(name, reduction)
    for results in ranks:
        got = results[f"{name}/{reduction}/manual"]
        for param, values in expected.items():
            torch.testing.assert_close(got[param]["sum_grad_squared"], values["sum_grad_squared"] / 16, **TOL)
            torch.testing.assert_close(got[param]["diag_ggn_exact"], values["diag_ggn_exact"] / 4, **TOL)


def check_function_api_synchronizes(ranks: list[dict], name: str, reduction: str) -> None:
    expected = full_batch_references(name, reduction)
    model, x, y, case = worker.global_batch(name)
    c = 1.0 if reduction == "sum" else 1.0 / (x.shape[0] * (y[0].numel() if case.y.is_floating_point() else 1))
    names = [k for k, _ in model.named_parameters()]
    for results in ranks:
        got = results[f"{name}/{reduction}/api"]
        for i, param in enumerate(names):
            torch.testing.assert_close(got["hessian"][i], expected[param]["diag_h"], **TOL)
            torch.testing.assert_close(got["ggn"][i], expected[param]["diag_ggn_exact"], **TOL)
            torch.testing.assert_close(got["empirical"][i], expected[param]["sum_grad_squared"] / c, **TOL)
        trace = sum(expected[p]["sum_grad_squared"].sum() for p in names) / c
        torch.testing.assert_close(got["empirical_trace"], trace, **TOL)
        per_layer = {
            layer: torch.cat([expected[f"{layer}.weight"]["diag_h"].flatten(), expected[f"{layer}.bias"]["diag_h"]])
            for layer in got["per_layer"]
        }
        assert got["per_layer"].keys() == per_layer.keys() and per_layer  # names of the wrapped module
        for layer, values in per_layer.items():
            torch.testing.assert_close(got["per_layer"][layer], values, **TOL)


def check_parameter_one_shard_does_not_reach(ranks: list[dict]) -> None:
    """``b`` is skipped by rank 0's forward (find_unused_parameters=True): both ranks get the global value."""
    model, x, y = worker.gated_batch()
    loss_fn = torch.nn.CrossEntropyLoss()
    pe = reference.per_example_grads(model, loss_fn, x, y)
    ggn = reference.ggn_diagonal(model, loss_fn, x, y)
    hess = reference.hessian_diagonal(model, loss_fn, x, y)
    assert pe["b.weight"][: worker.SHARDS[0]].abs().max() == 0 < pe["b.weight"].abs().max()
    for rank, results in enumerate(ranks):
        got = results["gated"]
        for param, g in pe.items():
            expected = {
                "sum_grad_squared": g.square().sum(0),
                "variance": g.var(0, unbiased=False),
                "diag_ggn_exact": ggn[param],
                "diag_h": hess[param],
            }
            for attribute, value in expected.items():
                torch.testing.assert_close(got[param][attribute], value, **TOL, msg=f"rank {rank} {param}.{attribute}")


def check_kronecker_layer_one_shard_does_not_reach(ranks: list[dict]) -> None:
    """KFLR of ``b``, which rank 0's shard skips: B is the full batch's (a sum, zero for the skipping
    examples); A counts rank 1's inputs only, ``N_1 / N`` times rank 1's own mean (documented)."""
    model, x, y = worker.gated_batch()
    with sh.extend(model, sh.KFLR()):
        torch.nn.functional.cross_entropy(model(x), y).backward()
    full_b = model.b.weight.kflr[0]
    model, x, y = worker.gated_batch()
    xr, yr = worker.shard(1, x, y)
    with sh.extend(model, sh.KFLR()):  # rank 1 alone, with its own reduction factor
        torch.nn.functional.cross_entropy(model(xr), yr).backward()
    share = worker.SHARDS[1] / sum(worker.SHARDS)
    for rank, results in enumerate(ranks):
        b, a = results["gated_kflr"]["b.weight"]["kflr"]
        torch.testing.assert_close(b, full_b, **TOL, msg=f"rank {rank}")
        torch.testing.assert_close(a, share * model.b.weight.kflr[1], **TOL, msg=f"rank {rank}")
        torch.testing.assert_close(results["gated_kflr"]["b.bias"]["kflr"][0], full_b, **TOL)


def check_accumulation(ranks: list[dict]) -> None:
    """Two micro-batches under DDP: the sums of their global batches' values, the rows of this rank of each."""
    refs = [full_batch_references("mlp_tanh", "mean", seed) for seed in (1, 2)]
    for rank, results in enumerate(ranks):
        got = results["accumulated"]
        start = sum(worker.SHARDS[:rank])
        rows = slice(start, start + worker.SHARDS[rank])
        for param in refs[0]:
            for attribute in ("sum_grad_squared", "diag_ggn_exact"):
                expected = refs[0][param][attribute] + refs[1][param][attribute]
                torch.testing.assert_close(got[param][attribute], expected, **TOL, msg=f"rank {rank} {param}")
            expected = torch.cat([refs[0][param]["grad_batch"][rows], refs[1][param]["grad_batch"][rows]])
            torch.testing.assert_close(got[param]["grad_batch"], expected, **TOL, msg=f"rank {rank} {param}")
        assert "cannot be combined under DistributedDataParallel" in got["variance_error"]


def kronecker_shard_values(name: str, reduction: str, rank: int | None) -> dict[str, dict[str, list[Tensor]]]:
    """The Kronecker factors one process computes on a shard (``rank``) or the whole batch (``None``)."""
    model, x, y, case = worker.global_batch(name)
    if rank is not None:
        x, y = worker.shard(rank, x, y)
    quantities = worker.kronecker_quantities(0 if rank is None else rank)
    with sh.extend(model, *quantities):
        case.loss_fn(reduction)(model(x), y).backward()
    present = lambda p: [q.attribute for q in quantities if hasattr(p, q.attribute)]  # noqa: E731
    return {k: {a: getattr(p, a) for a in present(p)} for k, p in model.named_parameters()}


def check_ddp_kronecker_factors_equal_the_full_batch(ranks: list[dict], name: str, reduction: str) -> None:
    """KFLR and KFACEmpirical (bias folded in): the factors of one process on the concatenated batch.

    KFAC's output factor is the ``c / c_r``-weighted sum of the shards' (same draws as one process on each
    shard), its input factor the full batch's. The engine's single-process factors are exact against
    brute-force references in tests/test_kronecker.py; here each factor's own shard weight is checked:
    ``c / c_r`` (or its square) for the sums, ``N_r / N`` for the input factor's mean.
    """
    full = kronecker_shard_values(name, reduction, None)
    shards = [kronecker_shard_values(name, reduction, r) for r in range(WORLD)]
    assert not torch.allclose(shards[0]["0.weight"]["kflr"][1], full["0.weight"]["kflr"][1]), "shards must differ"
    for rank, results in enumerate(ranks):
        got = results[f"{name}/{reduction}/kronecker"]
        for param, values in full.items():
            assert got["factors"][param].keys() == values.keys()
            for attribute in ("kflr", "kfac_empirical"):
                if attribute not in values:  # a folded bias has no attribute
                    continue
                for i, (g, e) in enumerate(zip(got["factors"][param][attribute], values[attribute])):
                    torch.testing.assert_close(g, e, **TOL, msg=f"rank {rank} {param}.{attribute}[{i}]")
            mc = got["factors"][param]["kfac"]
            w = [shard_weight(name, reduction, r) for r in range(WORLD)]
            torch.testing.assert_close(mc[0], sum(w[r] * shards[r][param]["kfac"][0] for r in range(WORLD)), **TOL)
            if len(mc) == 2:
                torch.testing.assert_close(mc[1], values["kflr"][1], **TOL, msg=f"rank {rank} {param}.kfac[1]")
        assert "EKFAC cannot be synchronized across processes" in got["ekfac_error"]
        assert "Kronecker factors over several backward passes" in got["accumulation_error"]


CHECKS = (
    check_ddp_quantities_equal_the_full_batch,
    check_ddp_kronecker_factors_equal_the_full_batch,
    check_ddp_grad_is_the_average_of_the_ranks,
    check_ddp_monte_carlo_is_the_weighted_sum_of_the_shards,
    check_sync_false_keeps_the_shard,
    check_sync_true_on_a_plain_model_with_a_scaled_loss,
    check_function_api_synchronizes,
)


def test_ddp_quick(tmp_path: Path) -> None:
    """The default run's check: one case, every quantity and .grad, the function API (one spawn)."""
    ranks = run_ranks(tmp_path, QUICK, everything=False)
    for name, reduction in QUICK:
        for check in CHECKS:
            check(ranks, name, reduction)


@pytest.mark.slow
def test_ddp_every_case(tmp_path: Path) -> None:
    """MLP and CNN (cross-entropy) and an MSE MLP, both reductions, and a parameter one shard does not reach.

    One spawn for all of them (one test, so that pytest-xdist does not spawn the ranks once per worker).
    """
    ranks = run_ranks(tmp_path, CASES, everything=True)
    for name, reduction in CASES:
        for check in CHECKS:
            try:
                check(ranks, name, reduction)
            except AssertionError as err:
                raise AssertionError(f"{check.__name__}[{name}, {reduction}]: {err}") from err
    check_parameter_one_shard_does_not_reach(ranks)
    check_kronecker_layer_one_shard_does_not_reach(ranks)
    check_accumulation(ranks)


@pytest.mark.slow
def test_torchrun_example() -> None:
    """The docs' example script, run as the docs say: torchrun with 2 processes (on 127.0.0.1)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(ROOT / "examples" / "ddp.py"),
        "--check",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "equal those of one process on the whole batch" in done.stdout, done.stdout
