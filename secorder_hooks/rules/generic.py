r"""Generic fallback rule: exact per-example quantities of any module by ``torch.func``.

The module is treated as a leaf: with :math:`\mathrm{out}_n(\theta)` the part of its
output that belongs to example ``n`` (a function of the module's own trainable
parameters :math:`\theta` and of example ``n``'s inputs only), the per-example gradient
of a vector :math:`g` at the output is :math:`\partial (g_n^\top \mathrm{out}_n) /
\partial\theta`, computed with :func:`torch.func.vjp` and vectorized over examples with
:func:`torch.func.vmap` (or a loop where the module's operators have no batching rule).

Where the example axis is comes from a :class:`~secorder_hooks.rules.layout.BatchLayout`
(:mod:`secorder_hooks.rules.layout`), looked up along the class MRO like the rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import _broadcast_to_and_flatten, tree_flatten, tree_unflatten

from secorder_hooks._warnings import onednn_disabled, vmap_fallbacks_allowed
from secorder_hooks.rules.base import LayerRule, ParamDict, register_rule, trainable_parameters
from secorder_hooks.rules.layout import BatchLayout, batch_layout_for, call_kwargs, output_indices
from secorder_hooks.rules.reparametrized import frozen_tensors, reparametrizations

__all__ = ["GenericRule", "GENERIC_RULE"]

Outputs = tuple[Tensor, ...]


def _as_tuple(x: Tensor | Sequence[Tensor]) -> Outputs:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class _Call:
    """One recorded call split into per-example inputs, re-runnable with other parameters.

    Attributes:
        values: The input tensors that carry examples (detached).
        in_axes: Their example axes.
        out_axes: Example axis of each differentiable output.
    """

    def __init__(
        self,
        module: nn.Module,
        inputs: Sequence[Any],
        grads: Outputs,
        params: dict[str, nn.Parameter],
        with_vector_axis: bool,
    ) -> None:
        self.module = module
        self.layout = batch_layout_for(module)
        self.indices = output_indices(inputs, len(grads))
        self.out_axes = self.layout.output_axes(module, inputs)
        if len(self.out_axes) != len(grads):
            raise ValueError(
                f"{type(module).__name__}: got {len(grads)} output gradient(s) for {len(self.out_axes)} output(s)."
            )
        self.n = grads[0].shape[self.out_axes[0] + int(with_vector_axis)]
        args_axes, kwargs_axes = self.layout.input_axes(module, inputs, self.n)
        self.leaves, self.spec = tree_flatten((tuple(inputs), dict(call_kwargs(inputs))))
        self.leaves = [x.detach() if isinstance(x, Tensor) else x for x in self.leaves]
        axes = _broadcast_to_and_flatten((args_axes, kwargs_axes), self.spec)
        if axes is None:
            raise ValueError(f"{type(self.layout).__name__} gave input axes that do not match the call's arguments.")
        self.batched = [i for i, (a, x) in enumerate(zip(axes, self.leaves)) if a is not None and isinstance(x, Tensor)]
        self.values = tuple(self.leaves[i] for i in self.batched)
        self.in_axes = tuple(axes[i] for i in self.batched)
        self.params = {k: p.detach() for k, p in params.items()}
        self.effective = _effective_tensors(module, inputs, self.params)

    def __call__(self, params: ParamDict, values: Sequence[Tensor]) -> Outputs:
        """Differentiable outputs of the module for inputs ``values`` (in place of the batched ones)."""
        leaves = list(self.leaves)
        for i, v in zip(self.batched, values):
            leaves[i] = v
        args, kwargs = tree_unflatten(leaves, self.spec)
        effective = {k: params[k] for k in self.effective if k in params}
        with frozen_tensors(self.module, effective):
            own = {k: v for k, v in params.items() if k not in effective} if effective else params
            flat = tree_flatten(functional_call(self.module, own, args, kwargs))[0]
        return tuple(flat[i] for i in self.indices)

    def example(self, params: ParamDict, values: Sequence[Tensor]) -> Outputs:
        """Outputs of one example from its inputs without the example axis (for ``vmap``)."""
        outs = self(params, [v.unsqueeze(a) for v, a in zip(values, self.in_axes)])
        return tuple(o.squeeze(a) for o, a in zip(outs, self.out_axes))

    def slices(self, n: int) -> tuple[Tensor, ...]:
        """Example ``n``'s inputs as a batch of one."""
        return tuple(v.narrow(a, n, 1) for v, a in zip(self.values, self.in_axes))


def _effective_tensors(module: nn.Module, inputs: Sequence[Any], params: dict[str, Tensor]) -> tuple[str, ...]:
    """Replace the originals of reparametrized tensors in ``params`` by the effective tensors (in place).

    The module is then a function of its effective ``weight`` (say), frozen at the value
    the recorded call used (:func:`~secorder_hooks.rules.reparametrized.frozen_tensors`);
    the engine's :class:`~secorder_hooks.rules.reparametrized.ReparametrizedRule` maps its
    gradients to the originals.

    Returns:
        The names of the effective tensors.
    """
    reparams = reparametrizations(module)
    if not reparams:
        return ()
    values = getattr(inputs, "effective", None) or {}
    for rp in reparams:
        for name in rp.originals:
            params.pop(name, None)
        value = values.get(rp.name)
        params[rp.name] = (getattr(module, rp.name) if value is None else value).detach()
    return tuple(rp.name for rp in reparams)


_UNBATCHABLE: set[tuple[type[nn.Module], str]] = set()
T = TypeVar("T")


@contextmanager
def _differentiable_kernels() -> Iterator[None]:
    """Select the kernels whose derivatives ``torch.func`` can take, for both paths of the rule.

    * Attention runs in the math kernel, made of batchable operations: ``vmap`` runs the
      fused CPU kernel, which has no batching rule, once per example (3x slower on the
      transformer benchmark), and the fused kernels have no double backward.
    * oneDNN (mkldnn) is disabled: differentiating its float32 CPU LSTM kernel with
      ``torch.func.vjp`` fails inside torch ("Expected a proper Tensor but got None ...
      for argument #22 'workspace'"); the native kernel computes the same function and
      is differentiable there.
    """
    with sdpa_kernel(SDPBackend.MATH), onednn_disabled():
        yield


def _over_examples(
    module: nn.Module, layout: BatchLayout, vectorized: Callable[[], T], one_by_one: Callable[[], T]
) -> T:
    """Run ``vectorized`` (vmap over examples), or ``one_by_one`` where vmap is known or found to fail.

    Some operators lack (correct) vmap batching rules, e.g. the double backward of
    ``prelu``; the loop computes the same quantity, so an error it raises is genuine.
    Both run with :func:`_differentiable_kernels`.
    """
    key = (type(module), one_by_one.__qualname__)
    if layout.vectorize and key not in _UNBATCHABLE:
        try:
            with vmap_fallbacks_allowed(), _differentiable_kernels():
                return vectorized()
        except RuntimeError:
            _UNBATCHABLE.add(key)
    with _differentiable_kernels():
        return one_by_one()


def _pull_vectors(pullback: Callable[[Outputs], tuple[ParamDict]], cotangents: Outputs) -> ParamDict:
    """Apply a ``vjp`` pullback to ``V`` stacked cotangents ``[V, *out]`` (no ``vmap`` level when ``V = 1``)."""
    if cotangents[0].shape[0] == 1:
        return {k: v.unsqueeze(0) for k, v in pullback(tuple(c[0] for c in cotangents))[0].items()}
    return vmap(pullback)(cotangents)[0]


def _hessian_diagonal(h: Callable[[Tensor], Tensor], theta: Tensor, chunk: int) -> Tensor:
    """Diagonal of the Hessian of scalar ``h`` at ``theta`` [P] by one-hot Hessian-vector products.

    Runs with :func:`_differentiable_kernels` (the fused attention kernels have no double backward).
    """
    with _differentiable_kernels():
        _, pullback = vjp(grad(h), theta)
        size = theta.numel()
        pieces = []
        for start in range(0, size, chunk):
            stop = min(size, start + chunk)
            tangents = torch.eye(size, dtype=theta.dtype, device=theta.device)[start:stop]
            pieces.append(vmap(pullback)(tangents)[0][..., start:stop].diagonal(dim1=-2, dim2=-1))
    return torch.cat(pieces, -1)


# ----------------------------------------------------------------------------- the rule
class GenericRule(LayerRule):
    r"""Exact per-example quantities of any module's own parameters, the module treated as a leaf.

    Handles keyword arguments, several (nested) outputs, non-tensor and shared
    arguments, and example axes other than 0 (see :class:`~secorder_hooks.rules.layout.BatchLayout`). ``grad_output``
    is ``[V, *out]`` for each differentiable output, ``*out`` in the module's own layout
    (``[V, N, *out]`` for the default layout); a tuple of them for several outputs.

    Args:
        hessian_chunk_size: One-hot Hessian-vector products evaluated at once in
            :meth:`~secorder_hooks.LayerRule.own_hessian_term` (bounds its memory).
        children: Names of child modules whose parameters the module uses functionally
            in its own forward without calling the child (``out_proj`` of
            :class:`torch.nn.MultiheadAttention`); the rule covers their parameters too.
            A child that is also called as a module must not be listed (its parameters
            would be counted twice).
    """

    def __init__(self, hessian_chunk_size: int = 256, children: tuple[str, ...] = ()) -> None:
        self.hessian_chunk_size = hessian_chunk_size
        self.children = tuple(children)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The trainable parameters the rule covers: the module's own and those of :attr:`children`."""
        params = trainable_parameters(module)
        for child in self.children:
            for name, p in trainable_parameters(module.get_submodule(child)).items():
                params[f"{child}.{name}"] = p
        return params

    def per_example_grads(
        self, module: nn.Module, inputs: Sequence[Any], grad_output: Tensor | Sequence[Tensor]
    ) -> ParamDict:
        r"""Per trainable parameter ``[V, N, *p]``: :math:`\partial (g^{(v)\top}_n \mathrm{out}_n) / \partial\theta`."""
        grads = _as_tuple(grad_output)
        call = _Call(module, inputs, grads, self.parameters(module), with_vector_axis=True)
        if not call.params:
            return {}
        cot_axes = tuple(1 + a for a in call.out_axes)

        def vectorized() -> ParamDict:
            def one_example(values: tuple[Tensor, ...], cotangents: Outputs) -> ParamDict:
                _, pullback = vjp(lambda p: call.example(p, values), call.params)
                return _pull_vectors(pullback, cotangents)

            out = vmap(one_example, in_dims=(call.in_axes, cot_axes))(call.values, grads)
            return {k: v.transpose(0, 1) for k, v in out.items()}

        def one_by_one() -> ParamDict:
            per_example = []
            for n in range(call.n):
                values = call.slices(n)
                _, pullback = vjp(lambda p, values=values: call(p, values), call.params)
                per_example.append(_pull_vectors(pullback, tuple(g.narrow(a, n, 1) for g, a in zip(grads, cot_axes))))
            return {k: torch.stack([d[k] for d in per_example], 1) for k in call.params}

        return _over_examples(module, call.layout, vectorized, one_by_one)

    def output_curvature(
        self,
        module: nn.Module,
        inputs: Sequence[Any],
        output_weights: Tensor | Sequence[Tensor],
        per_example: bool,
    ) -> ParamDict:
        r""":math:`\sum_e r_{ne} (\partial \mathrm{out}_{ne}/\partial\theta)^2`, one one-hot column per output element.

        ``output_weights`` is ``[*out]`` per differentiable output (module layout).
        """
        weights = _as_tuple(output_weights)
        axes = batch_layout_for(module).output_axes(module, inputs)
        flat = [r.movedim(a, 0).reshape(r.shape[a], -1) for r, a in zip(weights, axes)]  # [N, E_i]
        total = sum(f.shape[1] for f in flat)
        columns, offset = [], 0
        for r, a, f in zip(weights, axes, flat):
            n, e = f.shape
            block = r.new_zeros(total, n, e)
            block[offset : offset + e] = torch.eye(e, dtype=r.dtype, device=r.device).unsqueeze(1)
            rest = r.movedim(a, 0).shape[1:]
            columns.append(block.reshape(total, n, *rest).movedim(1, 1 + a))
            offset += e
        col_weights = torch.cat([f.T for f in flat], 0)  # [total, N]
        grads = columns[0] if len(columns) == 1 else tuple(columns)
        return self.weighted_squared_sum(module, inputs, grads, col_weights, per_example)

    def own_hessian_term(
        self,
        module: nn.Module,
        inputs: Sequence[Any],
        grad_output: Tensor | Sequence[Tensor],
        per_example: bool,
    ) -> ParamDict:
        r"""Diagonal of :math:`\nabla^2_\theta \sum_n g_n^\top \mathrm{out}_n(\theta)`, ``grad_output`` ``[*out]``.

        Computed exactly by one-hot Hessian-vector products (reverse over reverse), in
        chunks of :attr:`hessian_chunk_size`; it is zero (but still computed) for modules
        affine in their parameters.

        Returns:
            Per parameter name, ``p.shape``, or ``[N, *p.shape]`` if ``per_example``.
        """
        grads = tuple(g.detach() for g in _as_tuple(grad_output))
        call = _Call(module, inputs, grads, self.parameters(module), with_vector_axis=False)
        if not call.params:
            return {}
        names = list(call.params)
        shapes = [call.params[k].shape for k in names]
        theta = torch.cat([call.params[k].reshape(-1) for k in names])

        def unflatten(flat: Tensor) -> ParamDict:
            pieces = flat.split([s.numel() for s in shapes], -1)
            return {k: v.reshape(*v.shape[:-1], *s) for k, v, s in zip(names, pieces, shapes)}

        def contraction(outs: Outputs, cotangents: Outputs) -> Tensor:
            return sum((o * c).sum() for o, c in zip(outs, cotangents))

        chunk = self.hessian_chunk_size
        if not per_example:
            diag = _hessian_diagonal(lambda t: contraction(call(unflatten(t), call.values), grads), theta, chunk)
            return unflatten(diag)

        def vectorized() -> Tensor:
            def one_example(values: tuple[Tensor, ...], cotangents: Outputs) -> Tensor:
                return _hessian_diagonal(
                    lambda t: contraction(call.example(unflatten(t), values), cotangents), theta, chunk
                )

            return vmap(one_example, in_dims=(call.in_axes, call.out_axes))(call.values, grads)

        def one_by_one() -> Tensor:
            rows = []
            for n in range(call.n):
                values, cotangents = call.slices(n), tuple(g.narrow(a, n, 1) for g, a in zip(grads, call.out_axes))
                rows.append(
                    _hessian_diagonal(
                        lambda t, v=values, c=cotangents: contraction(call(unflatten(t), v), c), theta, chunk
                    )
                )
            return torch.stack(rows)

        return unflatten(_over_examples(module, call.layout, vectorized, one_by_one))

    def __repr__(self) -> str:
        return f"GenericRule(children={self.children!r})" if self.children else "GenericRule()"


GENERIC_RULE = GenericRule()
register_rule(nn.MultiheadAttention)(GenericRule(children=("out_proj",)))
