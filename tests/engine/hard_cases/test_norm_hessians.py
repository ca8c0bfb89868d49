"""Exact Hessian diagonals through instance and group normalization (float64, torch.func reference).

InstanceNorm runs batch norm with batch statistics on a ``[1, N * C, ...]`` view; its node
was treated as linear in its input (true only with running statistics), which dropped the
normalization's second-order term: the Hessian of the layers below was ~60% off.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from secorder_hooks import BatchDiagHessian, DiagHessian, UnsupportedOperationError, extend
from tests.support import reference

DT = torch.float64
N = 3

CASES = {  # factories: every test gets fresh modules (no .grad carried over to accumulate)
    "instance1d": (lambda: (nn.Conv1d(2, 3, 3), nn.InstanceNorm1d(3, affine=True)), (N, 2, 7)),
    "instance2d": (lambda: (nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True)), (N, 2, 5, 5)),
    "instance3d": (lambda: (nn.Conv3d(2, 3, 2), nn.InstanceNorm3d(3, affine=True)), (N, 2, 3, 3, 3)),
    "instance2d_plain": (lambda: (nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3)), (N, 2, 5, 5)),
    "group_1": (lambda: (nn.Conv2d(2, 4, 3), nn.GroupNorm(1, 4)), (N, 2, 5, 5)),
    "group_2": (lambda: (nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4)), (N, 2, 5, 5)),
    "group_4": (lambda: (nn.Conv2d(2, 4, 3), nn.GroupNorm(4, 4)), (N, 2, 5, 5)),
}


def build(name: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    layers, shape = CASES[name]
    conv, norm = layers()
    x = torch.randn(*shape, dtype=DT)
    model = nn.Sequential(conv, norm, nn.Tanh(), nn.Flatten())
    features = model.to(DT)(x).shape[1]
    model.append(nn.Linear(features, 3))
    return model.to(DT), x, torch.randint(0, 3, (N,))


def assert_close_to(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> None:
    # entries the loss is invariant to (the conv bias before a norm) are zero up to rounding of the others' scale
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-12 * scale)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(CASES))
def test_hessian_through_normalization(name: str, reduction: str) -> None:
    model, x, y = build(name)

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction=reduction)

    with extend(model, DiagHessian()):
        loss_fn(model(x), y).backward()
    expected = reference.hessian_diagonal(model, loss_fn, x, y)
    scale = max(v.abs().max().item() for v in expected.values())
    for k, p in model.named_parameters():
        assert_close_to(p.diag_h, expected[k], scale)


def test_per_example_hessian_through_instance_norm() -> None:
    model, x, y = build("instance2d")
    with extend(model, BatchDiagHessian()):
        F.cross_entropy(model(x), y).backward()
    expected = reference.per_example_hessian_diagonal(model, F.cross_entropy, x, y)
    scale = max(v.abs().max().item() for v in expected.values())
    for k, p in model.named_parameters():
        assert_close_to(p.diag_h_batch, expected[k], scale)


def test_batch_statistics_on_a_layout_that_is_not_instance_norm_raise() -> None:
    """Batch norm with batch statistics over a [1, K, ...] tensor the engine cannot split among examples."""

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.out = nn.Conv1d(2, 3, 3), nn.Linear(3 * 5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.conv(x)  # [N, 3, 5]
            rows = h.transpose(0, 1).reshape(1, 3 * N, 5)  # channel-major rows: not an instance-norm view
            h = F.batch_norm(rows, None, None, training=True).reshape(3, N, 5).transpose(0, 1)
            return self.out(torch.tanh(h).flatten(1))

    model = Odd().to(DT)
    x, y = torch.randn(N, 2, 7, dtype=DT), torch.randint(0, 3, (N,))
    with pytest.raises(UnsupportedOperationError, match="NativeBatchNormBackward0"), extend(model, DiagHessian()):
        F.cross_entropy(model(x), y).backward()
