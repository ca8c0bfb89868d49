r"""Check a layer rule against brute-force autograd on one call of its module.

Every method of a :class:`~secorder_hooks.rules.base.LayerRule` is compared, in float64,
with a reference that differentiates the whole batched call once per example and vector:
the per-example gradient of a vector :math:`g` is the gradient of
:math:`\langle g \odot m_n, \mathrm{out}\rangle` with :math:`m_n` the mask of example
``n`` along the module's example axis. This is exact for any module whose example ``n``
of the output depends only on example ``n`` of the input.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_map

from secorder_hooks.rules.base import LayerRule, ParamDict, rule_parameters
from secorder_hooks.rules.inputs import CallInputs
from secorder_hooks.rules.layout import batch_layout_for
from secorder_hooks.rules.lookup import rule_for

__all__ = ["check_rule"]


def check_rule(
    module: nn.Module,
    inputs: Tensor | Sequence[Any],
    rule: LayerRule | None = None,
    *,
    atol: float = 1e-9,
    rtol: float = 1e-7,
    num_vectors: int = 3,
    kwargs: dict[str, Any] | None = None,
    seed: int = 0,
) -> None:
    r"""Assert that ``rule`` computes exact quantities for ``module`` called on ``inputs``.

    The module and floating-point inputs are copied to float64. ``num_vectors`` random
    vectors ``[V, *out]`` at the output are drawn (and random signs ``[V, N]`` as
    weights); the rule's :meth:`~LayerRule.per_example_grads`,
    :meth:`~LayerRule.weighted_squared_sum` (both ``per_example`` values, with and
    without weights), :meth:`~LayerRule.squared_norms`,
    :meth:`~LayerRule.output_curvature` (single-output modules) and
    :meth:`~LayerRule.own_hessian_term` (an empty dict claims zero, which is checked
    too) must match brute force within ``atol + rtol * |reference|``.

    Example:
        >>> import torch
        >>> from secorder_hooks import check_rule
        >>> check_rule(torch.nn.Linear(3, 2), torch.randn(4, 3))
        >>> check_rule(torch.nn.Bilinear(3, 2, 2), (torch.randn(4, 3), torch.randn(4, 2)))

    Args:
        module: The module (not modified; a float64 copy is used).
        inputs: The positional argument(s) of the call, ``[N, ...]`` (or a
            :class:`~secorder_hooks.rules.inputs.CallInputs` with keyword arguments).
        rule: The rule to check; default: the one :func:`~secorder_hooks.rules.rule_for` picks.
        atol: Absolute tolerance.
        rtol: Relative tolerance.
        num_vectors: Number ``V`` of random output vectors.
        kwargs: Keyword arguments of the call.
        seed: Seed of the random vectors.

    Raises:
        AssertionError: A quantity differs; the message names the method, the
            parameter and the largest error.
    """
    module = _to_double(copy.deepcopy(module))
    args = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    kwargs = dict(kwargs or getattr(inputs, "kwargs", None) or {})
    args, kwargs = _to_double(args), _to_double(kwargs)
    rule = rule or rule_for(module)
    params = rule_parameters(rule, module)
    if not params:
        raise ValueError(f"check_rule: {type(module).__name__} has no trainable parameters to check.")
    flat = tree_flatten(module(*args, **kwargs))[0]
    indices = tuple(i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad)
    outs = [flat[i] for i in indices]
    call = CallInputs(args, kwargs, indices)
    out_axes = batch_layout_for(module).output_axes(module, call)
    n = outs[0].shape[out_axes[0]]
    gen = torch.Generator().manual_seed(seed)
    vectors = tuple(torch.randn(num_vectors, *o.shape, generator=gen, dtype=o.dtype) for o in outs)
    signs = torch.randint(0, 2, (num_vectors, n), generator=gen).double() * 2 - 1
    rule_vectors = vectors[0] if len(outs) == 1 else vectors
    expect = _Expectation(module, rule, atol, rtol)

    ref = _brute_per_example(outs, params, vectors, out_axes, n)  # [V, N, *p]
    expect.close("per_example_grads", rule.per_example_grads(module, call, rule_vectors), ref)
    for weights in (None, signs):
        for per_example in (False, True):
            want = {}
            for k, g in ref.items():
                w = 1.0 if weights is None else weights.reshape(num_vectors, n, *[1] * (g.dim() - 2))
                want[k] = (w * g.square()).sum(0) if per_example else (w * g.square()).sum((0, 1))
            got = rule.weighted_squared_sum(module, call, rule_vectors, weights, per_example)
            label = f"weighted_squared_sum(weights={'None' if weights is None else 'signs'}, per_example={per_example})"
            expect.close(label, got, want)
    norms = {k: g.reshape(*g.shape[:2], -1).square().sum(-1) for k, g in ref.items()}
    expect.close("squared_norms", rule.squared_norms(module, call, rule_vectors), norms)

    if len(outs) == 1:
        r = torch.randn(outs[0].shape, generator=gen, dtype=outs[0].dtype)
        want = _brute_output_curvature(outs[0], params, r, out_axes[0], n)
        for per_example in (False, True):
            got = rule.output_curvature(module, call, r, per_example)
            expect.close(f"output_curvature(per_example={per_example})", got, _reduce(want, per_example))

    cotangents = tuple(v[0] for v in vectors)
    want = _brute_own_hessian(module, args, kwargs, indices, params, cotangents, out_axes, n)
    for per_example in (False, True):
        reference = _reduce(want, per_example)
        got = rule.own_hessian_term(module, call, cotangents[0] if len(outs) == 1 else cotangents, per_example)
        got = got or {k: torch.zeros_like(v) for k, v in reference.items()}  # {} claims an affine module
        expect.close(f"own_hessian_term(per_example={per_example})", got, reference)


class _Expectation:
    """Formats mismatches between a rule's results and the references."""

    def __init__(self, module: nn.Module, rule: LayerRule, atol: float, rtol: float) -> None:
        self.where = f"{_rule_name(rule)} on {type(module).__name__}"
        self.atol, self.rtol = atol, rtol

    def close(self, method: str, got: ParamDict, want: ParamDict) -> None:
        if set(got) != set(want):
            raise AssertionError(
                f"{self.where}: {method} returned parameters {sorted(got)}, expected the trainable {sorted(want)}."
            )
        for name, expected in want.items():
            actual = got[name]
            if actual.shape != expected.shape:
                raise AssertionError(
                    f"{self.where}: {method} of parameter '{name}' has shape {tuple(actual.shape)}, "
                    f"expected {tuple(expected.shape)}."
                )
            error = (actual.double() - expected).abs()
            if not bool((error <= self.atol + self.rtol * expected.abs()).all()):
                raise AssertionError(
                    f"{self.where}: {method} of parameter '{name}' differs from brute force: max abs error "
                    f"{error.max().item():.3e} (max |reference| {expected.abs().max().item():.3e}, "
                    f"atol={self.atol}, rtol={self.rtol})."
                )


def _rule_name(rule: LayerRule) -> str:
    """``repr(rule)`` where its class defines one (``GenericRule()``), else the class name (``ScaleRule``)."""
    return repr(rule) if type(rule).__repr__ is not object.__repr__ else type(rule).__qualname__


def _to_double(tree: Any) -> Any:
    if isinstance(tree, nn.Module):
        return tree.double()
    return tree_map(lambda x: x.double() if isinstance(x, Tensor) and x.is_floating_point() else x, tree)


def _mask(shape: torch.Size, axis: int, n: int) -> Tensor:
    """``[*shape]`` 1 on example ``n`` along ``axis``, else 0."""
    index = torch.zeros(shape[axis], dtype=torch.float64)
    index[n] = 1
    return index.reshape(*[1] * axis, -1, *[1] * (len(shape) - axis - 1)).expand(shape)


def _brute_per_example(
    outs: list[Tensor], params: dict[str, Tensor], vectors: tuple[Tensor, ...], axes: Sequence[int], n: int
) -> ParamDict:
    names = list(params)
    rows = []
    for v in range(vectors[0].shape[0]):
        row = []
        for i in range(n):
            cot = [g[v] * _mask(o.shape, a, i) for g, o, a in zip(vectors, outs, axes)]
            gs = torch.autograd.grad(outs, [params[k] for k in names], cot, retain_graph=True, allow_unused=True)
            row.append([torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, gs)])
        rows.append(row)
    return {k: torch.stack([torch.stack([r[j] for r in row]) for row in rows]) for j, k in enumerate(names)}


def _brute_output_curvature(out: Tensor, params: dict[str, Tensor], r: Tensor, axis: int, n: int) -> ParamDict:
    """``[N, *p]``: sum over the elements of example ``n`` of ``r * (d out_e / d p)**2``."""
    result = {k: torch.zeros(n, *p.shape, dtype=torch.float64) for k, p in params.items()}
    example_of = torch.arange(n).reshape(*[1] * axis, -1, *[1] * (out.dim() - axis - 1)).expand(out.shape).reshape(-1)
    flat_out, flat_r = out.reshape(-1), r.reshape(-1)
    for e in range(flat_out.numel()):
        gs = torch.autograd.grad(flat_out[e], list(params.values()), retain_graph=True, allow_unused=True)
        for k, g in zip(params, gs):
            if g is not None:
                result[k][example_of[e]] += flat_r[e] * g.square()
    return result


def _brute_own_hessian(
    module: nn.Module,
    args: tuple,
    kwargs: dict,
    indices: tuple[int, ...],
    params: dict[str, Tensor],
    cotangents: tuple[Tensor, ...],
    axes: Sequence[int],
    n: int,
) -> ParamDict:
    """``[N, *p]``: Hessian diagonal of ``<g * mask_n, out(theta)>`` per example."""
    theta = {k: p.detach() for k, p in params.items()}
    rows = []
    for i in range(n):
        masked = [g * _mask(g.shape, a, i) for g, a in zip(cotangents, axes)]

        def h(p: dict[str, Tensor], masked: list[Tensor] = masked) -> Tensor:
            flat = tree_flatten(functional_call(module, p, args, kwargs))[0]
            return sum((flat[j] * g).sum() for j, g in zip(indices, masked))

        with sdpa_kernel(SDPBackend.MATH):  # fused attention kernels have no double backward
            hess = jacrev(grad(h))(theta)
        rows.append({k: hess[k][k].reshape(v.numel(), v.numel()).diagonal().reshape(v.shape) for k, v in theta.items()})
    return {k: torch.stack([row[k] for row in rows]) for k in theta}


def _reduce(per_example: ParamDict, keep: bool) -> ParamDict:
    return per_example if keep else {k: v.sum(0) for k, v in per_example.items()}
