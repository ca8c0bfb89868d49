"""Property tests: Linear and Conv rules over random hyperparameters and shapes (float64).

For every drawn layer the rule's per-example gradients of ``V`` random output vectors equal
``torch.func`` per-example VJPs, and every fast path (weighted squared sums, squared norms,
output curvature) equals the same reduction of those gradients or of the Jacobian.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vjp, vmap

from secorder_hooks.rules import rule_for
from secorder_hooks.rules.base import trainable_parameters
from secorder_hooks.rules.conv import GROUPED_MIN_CHANNELS

DT = torch.float64
SETTINGS = settings(max_examples=25, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def func_per_example(module: nn.Module, x: Tensor, g: Tensor) -> dict[str, Tensor]:
    """``[V, N, *p]`` per-example VJPs of each vector, one example at a time through torch.func."""
    params = {k: p.detach() for k, p in trainable_parameters(module).items()}

    def example(xn: Tensor, gn: Tensor) -> dict[str, Tensor]:
        _, pullback = vjp(lambda p: functional_call(module, p, (xn.unsqueeze(0),)).squeeze(0), params)
        return vmap(pullback)(gn)[0]

    out = vmap(example, in_dims=(0, 1))(x, g)  # {name: [N, V, *p]}
    return {k: v.transpose(0, 1) for k, v in out.items()}


def check(module: nn.Module, x: Tensor, v: int) -> None:
    rule = rule_for(module)
    out = module(x)
    n = out.shape[0]
    g = torch.randn(v, *out.shape, dtype=DT)
    weights = torch.randn(v, n, dtype=DT)
    expected = func_per_example(module, x, g)
    got = rule.per_example_grads(module, (x,), g)
    assert got.keys() == expected.keys()
    for k, e in expected.items():
        torch.testing.assert_close(got[k], e)
    for per_example in (False, True):
        got = rule.weighted_squared_sum(module, (x,), g, weights, per_example)
        for k, e in expected.items():
            sq = (e.square() * weights.reshape(v, n, *[1] * (e.dim() - 2))).sum(0)
            torch.testing.assert_close(got[k], sq if per_example else sq.sum(0))
    got = rule.squared_norms(module, (x,), g)
    for k, e in expected.items():
        torch.testing.assert_close(got[k], e.flatten(2).square().sum(-1))
    params = {k: p.detach() for k, p in trainable_parameters(module).items()}
    jac = jacrev(lambda p: functional_call(module, p, (x,)))(params)
    r = torch.randn_like(out)
    got = rule.output_curvature(module, (x,), r, per_example=True)
    for k, p in params.items():
        j = jac[k].reshape(n, -1, p.numel())
        want = torch.einsum("ne,nep->np", r.reshape(n, -1), j.square()).reshape(n, *p.shape)
        torch.testing.assert_close(got[k], want)


@st.composite
def linear_cases(draw: st.DrawFn) -> tuple[nn.Module, Tensor, int]:
    d_in, d_out = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    lead = draw(st.lists(st.integers(1, 4), max_size=2))
    module = nn.Linear(d_in, d_out, bias=draw(st.booleans()), dtype=DT)
    if module.bias is not None and draw(st.booleans()):
        module.weight.requires_grad_(False)
    x = torch.randn(draw(st.integers(1, 4)), *lead, d_in, dtype=DT)
    return module, x, draw(st.integers(1, 4))


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[nn.Module, Tensor, int]:
    dim = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.integers(1, 3))
    # few channels per group take the patch path, GROUPED_MIN_CHANNELS or more the grouped-convolution one
    c_in = groups * draw(st.sampled_from([1, 2, GROUPED_MIN_CHANNELS]))
    c_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    padding_kind = draw(st.sampled_from(["int", "same", "valid"]))
    stride = (1,) * dim if padding_kind == "same" else tuple(draw(st.integers(1, 3)) for _ in range(dim))
    reach = [d * (k - 1) for k, d in zip(kernel, dilation)]
    if padding_kind == "int":
        padding: object = tuple(draw(st.integers(0, 2)) for _ in range(dim))
    else:
        padding = padding_kind
    # per-side padding (an upper bound for 'same'); inputs must fit the kernel and exceed reflect padding
    pads = reach if padding_kind == "same" else (list(padding) if padding_kind == "int" else [0] * dim)
    smallest = [max(r + 1 - 2 * p, p + 1) for r, p in zip(reach, pads)]
    spatial = [draw(st.integers(low, low + 3)) for low in smallest]
    module = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim](
        c_in,
        c_out,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
        dtype=DT,
    )
    x = torch.randn(draw(st.integers(1, 3)), c_in, *spatial, dtype=DT)
    return module, x, draw(st.integers(1, 3))


@SETTINGS
@given(linear_cases())
def test_linear_rule_properties(case: tuple[nn.Module, Tensor, int]) -> None:
    check(*case)


@SETTINGS
@given(conv_cases())
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv_rule_properties(case: tuple[nn.Module, Tensor, int]) -> None:
    check(*case)


EXHAUSTIVE = settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.slow
@EXHAUSTIVE
@given(linear_cases())
def test_linear_rule_properties_exhaustive(case: tuple[nn.Module, Tensor, int]) -> None:
    check(*case)


@pytest.mark.slow
@EXHAUSTIVE
@given(conv_cases())
@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
def test_conv_rule_properties_exhaustive(case: tuple[nn.Module, Tensor, int]) -> None:
    check(*case)
