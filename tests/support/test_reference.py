"""The brute-force references agree with each other where they must."""

import torch
from torch import nn

from tests.support import reference


def test_ggn_equals_hessian_for_linear_model_with_mse() -> None:
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    loss = nn.MSELoss()
    ggn = reference.ggn_diagonal(model, loss, x, y)
    hess = reference.hessian_diagonal(model, loss, x, y)
    for k in ggn:
        torch.testing.assert_close(ggn[k], hess[k])


def test_per_example_grads_sum_to_gradient() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss_fn = nn.CrossEntropyLoss()
    pe = reference.per_example_grads(model, loss_fn, x, y)
    loss_fn(model(x), y).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(pe[k].sum(0), p.grad)
