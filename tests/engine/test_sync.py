"""Synchronization options and errors, in one process (a gloo group of one rank, no network).

The numbers across processes are tested in tests/test_distributed.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
from torch import nn

import secorder_hooks as sh
from secorder_hooks.engine.sync import scaled_loss_call, sync_group
from secorder_hooks.losses import record_loss_calls
from secorder_hooks.quantities import Order

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


@pytest.fixture
def one_rank() -> Iterator[None]:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def small() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return model, torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))


def test_sync_true_needs_an_initialized_process_group() -> None:
    model, x, y = small()
    with (
        pytest.raises(sh.ExtensionError, match="is not initialized"),
        sh.extend(model, sh.SumGradSquared(), sync=True),
    ):
        pass
    with pytest.raises(sh.ExtensionError, match="not initialized"):
        sh.model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, sync=True)


def test_sync_rejects_other_values() -> None:
    model, _, _ = small()
    with pytest.raises(TypeError, match="sync must be None, True, False or a"):
        sync_group(model, "yes")
    assert sync_group(model, None) is None and sync_group(model, False) is None


def test_scaled_loss_call_accepts_constant_factors_only() -> None:
    model, x, y = small()
    with record_loss_calls() as calls:
        loss = nn.functional.cross_entropy(model(x), y)
    assert scaled_loss_call(loss, calls) is calls[0]
    assert scaled_loss_call(loss / 4, calls) is calls[0]
    assert scaled_loss_call(0.5 * (loss * 2), calls) is calls[0]
    for other in (loss.exp(), 4 / loss, loss + model(x).square().mean(), model(x).square().mean()):
        with pytest.raises(sh.ExtensionError, match="one recognized loss function"):
            scaled_loss_call(other, calls)


def test_one_rank_is_the_unsynchronized_result(one_rank: None) -> None:
    quantities = (sh.BatchGrad(), sh.SumGradSquared(), sh.Variance(), sh.DiagGGNExact(), sh.DiagHessian())
    model, x, y = small()
    results = {}
    for sync in (False, True):
        model.zero_grad(set_to_none=True)
        with sh.extend(model, *quantities, sync=sync):
            nn.functional.mse_loss(model(x), torch.zeros(6, 3, dtype=torch.float64)).backward()
        results[sync] = [[getattr(p, q.attribute) for q in quantities] for p in model.parameters()]
    for a, b in zip(results[False], results[True]):
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, atol=1e-14, rtol=1e-12)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    for u, v in zip(
        sh.model_hessian_diagonal(model, loss_fn, x, y, sync=False),
        sh.model_hessian_diagonal(model, loss_fn, x, y, sync=dist.group.WORLD),
    ):
        torch.testing.assert_close(u, v, atol=1e-14, rtol=1e-12)


@dataclass(frozen=True)
class Undeclared(sh.Quantity):
    """A quantity of a user's that does not say how it combines across processes."""

    attribute: ClassVar[str] = "undeclared"
    order: ClassVar[Order] = Order.FIRST


def test_sync_errors(one_rank: None) -> None:
    model, x, y = small()
    with (
        pytest.raises(sh.ExtensionError, match="does not declare how it combines"),
        sh.extend(model, sh.SumGradSquared(), Undeclared(), sync=True),
    ):
        nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad()  # the failed pass left .grad (and removed the quantities)
    with (
        pytest.raises(sh.ExtensionError, match="one recognized loss function"),
        sh.extend(model, sh.DiagGGNExact(), sync=True),
    ):
        model(x).square().mean().backward()
    with pytest.raises(sh.ExtensionError, match="not differentiable"), sh.extend(model, sh.SumGradSquared(), sync=True):
        nn.functional.cross_entropy(model(x), y).backward(create_graph=True)
    model.zero_grad()
    with (
        pytest.raises(sh.ExtensionError, match="every target is ignored"),
        sh.extend(model, sh.SumGradSquared(), sync=True),
    ):
        nn.functional.cross_entropy(model(x), torch.full_like(y, -100)).backward()
    with pytest.raises(sh.ExtensionError, match="create_graph=True cannot be synchronized"):
        sh.model_hessian_diagonal(model, nn.CrossEntropyLoss(), x, y, create_graph=True, sync=True)
    for p in model.parameters():  # nothing is left behind by the failed passes
        assert not hasattr(p, "undeclared")
