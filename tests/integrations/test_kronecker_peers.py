"""Kronecker factors against BackPACK's KFLR/KFAC and curvlinops' KFAC (skipped where they are not installed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import secorder_hooks as sh
from tests.support import zoo

EXPAND, REDUCE = sh.WeightSharing.EXPAND, sh.WeightSharing.REDUCE
TOL = {"atol": 1e-7, "rtol": 1e-7}


def ours(case, reduction, quantity):
    model, loss_fn = case.model, case.loss_fn(reduction)
    model.zero_grad()
    with sh.extend(model, quantity):
        loss_fn(model(case.x), case.y).backward()
    return {name: getattr(p, quantity.attribute) for name, p in model.named_parameters()}


def cnn():
    """Conv-ReLU-MaxPool-Conv(stride 2)-ReLU-Flatten-Linear (BackPACK's AvgPool fails in float64)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(3, 4, 2, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    return zoo.Case("cnn", model, torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,)), zoo._ce).to(torch.float64)


def cases():
    return [zoo.make("mlp_tanh", torch.float64), cnn()]


def output_locations(case):
    """Output locations of each convolution (BackPACK's input factor of a convolution is not divided by them)."""
    sizes, handles = {}, []
    for name, module in case.model.named_modules():
        if isinstance(module, nn.Conv2d):
            hook = lambda m, i, o, name=name: sizes.update({name: o[0, 0].numel()})  # noqa: E731
            handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        case.model(case.x)
    for h in handles:
        h.remove()
    return sizes


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_against_backpack_kflr_and_kfac(case, reduction):
    backpack = pytest.importorskip("backpack")
    from backpack import extensions

    expand = ours(case, reduction, sh.KFLR(sharing=EXPAND))
    reduce = ours(case, reduction, sh.KFLR(sharing=REDUCE))
    mc = ours(case, reduction, sh.KFAC(sharing=EXPAND))
    locations = output_locations(case)
    model = backpack.extend(case.model)
    loss_fn = backpack.extend(case.loss_fn(reduction))
    with backpack.backpack(extensions.KFLR(), extensions.KFAC()):
        loss_fn(model(case.x), case.y).backward()
    for name, p in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        # BackPACK: B summed over output locations first (our REDUCE), A over patches not divided by them
        torch.testing.assert_close(reduce[name][0], p.kflr[0], **TOL, msg=name)
        if len(p.kflr) == 2:
            scale = locations.get(module, 1)
            torch.testing.assert_close(expand[name][1] * scale, p.kflr[1], **TOL, msg=name)
            torch.testing.assert_close(mc[name][1] * scale, p.kfac[1], **TOL, msg=name)
        if module not in locations:  # a Linear layer: all conventions agree
            torch.testing.assert_close(expand[name][0], p.kflr[0], **TOL, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("sharing", [EXPAND, REDUCE])
@pytest.mark.parametrize("case", cases(), ids=lambda c: c.name)
def test_against_curvlinops_kfac(case, sharing, reduction):
    curvlinops = pytest.importorskip("curvlinops")
    got = ours(case, reduction, sh.KFLR(sharing=sharing))
    empirical = ours(case, reduction, sh.KFACEmpirical(sharing=sharing))
    params = [p for p in case.model.parameters() if p.requires_grad]
    c = 1.0 if reduction == "sum" else 1.0 / case.x.shape[0]
    for fisher, expected, scale in (
        (curvlinops.FisherType.TYPE2, got, 1.0),
        (curvlinops.FisherType.EMPIRICAL, empirical, c),  # curvlinops' EF is c sum_n grad l_n grad l_n^T
    ):
        linop = curvlinops.KFACLinearOperator(
            case.model,
            case.loss_fn(reduction),
            params,
            [(case.x, case.y)],
            fisher_type=fisher,
            kfac_approx=sharing.value,
            check_deterministic=False,
        )
        linop.compute_kronecker_factors()
        for module, gradient in linop._gradient_covariances.items():
            mine = expected[f"{module}.weight"]
            torch.testing.assert_close(mine[0], gradient * scale, **TOL, msg=module)
            torch.testing.assert_close(mine[1], linop._input_covariances[module], **TOL, msg=module)
            torch.testing.assert_close(expected[f"{module}.bias"][0], gradient * scale, **TOL, msg=module)
