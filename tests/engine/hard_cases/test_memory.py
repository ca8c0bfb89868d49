"""Forward passes without a backward inside extend() must not accumulate records."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secorder_hooks import BatchGrad, DiagHessian, extend
from tests.support import reference
from tests.support.checks import live_tensors

DT = torch.float64


MODES: dict[str, Callable[[], AbstractContextManager]] = {
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


@pytest.mark.parametrize("mode", list(MODES))
def test_evaluation_forwards_keep_nothing(mode: str) -> None:
    """An evaluation loop (forward and loss) inside the training loop's context: flat over 1,000 forwards."""
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    with extend(model, BatchGrad(), DiagHessian()):
        with MODES[mode]():
            F.cross_entropy(model(x), y)
        baseline = live_tensors()
        for _ in range(1000):
            with MODES[mode]():
                F.cross_entropy(model(x), y)
        assert live_tensors() == baseline
        F.cross_entropy(model(x), y).backward()  # training still works and is exact
    grads = reference.per_example_grads(model, F.cross_entropy, x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, grads[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("with_loss", [False, True])
def test_freed_grad_enabled_forwards_keep_nothing(with_loss: bool) -> None:
    """Forwards with gradients enabled whose outputs (and losses) are dropped: flat over 1,000 forwards.

    Was: live tensors 105 -> 1005 over 900 forwards. The records go with the graph (the garbage
    collector frees the cycle through the output's node), and the next backward is still exact.
    """
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(6, 4, dtype=DT), torch.randint(0, 3, (6,))
    with extend(model, BatchGrad(), DiagHessian()) as session:
        out = model(x)
        if with_loss:
            F.cross_entropy(out, y)
        del out
        baseline = live_tensors()
        for _ in range(1000):
            out = model(x)
            if with_loss:
                F.cross_entropy(out, y)
            del out
        assert live_tensors() == baseline
        assert len(session.records) == 0
        kept = F.cross_entropy(model(x), y)  # a loss kept across other forwards keeps its records
        for _ in range(10):
            model(x)
        live_tensors()
        kept.backward()
    grads = reference.per_example_grads(model, F.cross_entropy, x, y)
    hess = reference.hessian_diagonal(model, F.cross_entropy, x, y)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad_batch, grads[k], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(p.diag_h, hess[k], rtol=1e-10, atol=1e-12)
