r"""Rule for :class:`torch.nn.Linear` on inputs ``[N, *, in]``, and the outer-product sums it shares.

With :math:`y_{nt} = W x_{nt} + b` over positions ``t`` of example ``n`` (none for 2-D
input), the per-example gradients of a vector :math:`g` at the output are
:math:`\sum_t g_{nt} x_{nt}^\top` and :math:`\sum_t g_{nt}`. For 2-D inputs the squared
sums and norms factorize and never materialize ``[V, N, out, in]``; with positions the
norms use the Gram trick :math:`\|\sum_t g_t x_t^\top\|^2 = \sum_{t,s} (g_t^\top g_s)(x_t^\top x_s)`
when that is cheaper, and the squared sums materialize in chunks of vectors.

The helpers :func:`outer_sums`, :func:`outer_sum_squared_norms` and
:func:`outer_sum_weighted_squares` work on *grouped* position-summed outer products
(``x`` ``[N, G, T, I]``, ``g`` ``[V, N, G, T, O]``); a convolution is such a product over
its unfolded input patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

import torch
from einops import einsum, rearrange
from torch import Tensor, nn

from secorder_hooks.quantities import WeightSharing
from secorder_hooks.rules.base import LayerRule, ParamDict, register_rule, square_sum, weighted_square_reduce
from secorder_hooks.rules.kronecker import input_moment, output_moment

__all__ = [
    "LinearRule",
    "NormStrategy",
    "outer_sums",
    "outer_sum_squared_norms",
    "outer_sum_weighted_squares",
]

#: Upper bound on the elements of one materialized chunk ``[v, N, G, O, I]``. Cache-sized
#: (2 MiB in float32): the chunk is squared and summed while it is still in cache, which
#: made the weighted squares of the transformer benchmark's Linear layers (9 vectors,
#: ``[32, 16, 64]`` inputs) twice as fast as one 19 MB chunk.
CHUNK_ELEMENTS = 2**19


class NormStrategy(Enum):
    """How :func:`outer_sum_squared_norms` computes the norms."""

    AUTO = "auto"
    """Pick the cheaper of the two by a flop count."""
    MATERIALIZE = "materialize"
    """Form :math:`\\sum_t g_t x_t^\\top` (in chunks of vectors) and square it."""
    GRAM = "gram"
    """:math:`\\sum_{t,s} (g_t^\\top g_s)(x_t^\\top x_s)`, never forming the outer products."""


def _chunks(v: int, per_vector: int) -> list[slice]:
    """Slices of ``range(v)`` whose materialized size stays below :data:`CHUNK_ELEMENTS`."""
    size = max(1, CHUNK_ELEMENTS // max(per_vector, 1))
    return [slice(i, min(i + size, v)) for i in range(0, v, size)]


def outer_sums(g: Tensor, x: Tensor) -> Tensor:
    r"""Per-example grouped outer-product sums :math:`\sum_t g_{vngt} x_{ngt}^\top`.

    Without positions (``T = 1``) this is one broadcast product; for one vector (``V = 1``)
    one batched matrix product over ``(n, g)`` that reads ``g`` and ``x`` without copies
    when their last two axes are strided like a (transposed) matrix.

    Args:
        g: ``[V, N, G, T, O]`` output vectors.
        x: ``[N, G, T, I]`` inputs.

    Returns:
        ``[V, N, G, O, I]``.
    """
    if g.shape[3] == 1:
        return g[:, :, :, 0, :, None] * x[:, :, 0, None, :]
    if g.shape[0] == 1:
        return torch.matmul(g[0].transpose(-1, -2), x).unsqueeze(0)
    return torch.einsum("vngto,ngti->vngoi", g, x)


def outer_sum_squared_norms(g: Tensor, x: Tensor, strategy: NormStrategy = NormStrategy.AUTO) -> Tensor:
    r""":math:`\sum_g \|\sum_t g_{vngt} x_{ngt}^\top\|_F^2`, exactly (cross-position terms included).

    Args:
        g: ``[V, N, G, T, O]`` output vectors.
        x: ``[N, G, T, I]`` inputs.
        strategy: Gram trick, materialization, or the cheaper by flop count.

    Returns:
        ``[V, N]``.
    """
    v, n, groups, t, o = g.shape
    i = x.shape[-1]
    if t == 1 and strategy is NormStrategy.AUTO:
        # ||g x^T||^2 = ||g||^2 ||x||^2 for each group, by reductions that form no squared copy
        g_norms = torch.linalg.vector_norm(g[:, :, :, 0], dim=-1).square_()  # [V, N, G]
        return (g_norms * torch.linalg.vector_norm(x[:, :, 0], dim=-1).square_()).sum(-1)
    if strategy is NormStrategy.AUTO:
        gram_flops = n * groups * t * t * (i + v * o)
        materialize_flops = v * n * groups * t * o * i
        strategy = NormStrategy.GRAM if gram_flops < materialize_flops else NormStrategy.MATERIALIZE
    if strategy is NormStrategy.MATERIALIZE:
        parts = [outer_sums(g[s], x).square_().sum((2, 3, 4)) for s in _chunks(v, n * groups * o * i)]
        return torch.cat(parts)
    x_gram = einsum(x, x, "n g t i, n g s i -> n g t s")
    parts = [
        einsum(einsum(g[s], g[s], "v n g t o, v n g s o -> v n g t s"), x_gram, "v n g t s, n g t s -> v n")
        for s in _chunks(v, n * groups * t * t)
    ]
    return torch.cat(parts)


def outer_sum_weighted_squares(g: Tensor, x: Tensor, weights: Tensor | None, per_example: bool) -> Tensor:
    r""":math:`\sum_v w_{vn} (\sum_t g_{vngt} x_{ngt}^\top)^2`, summed over ``n`` unless ``per_example``.

    Without positions (``T = 1``) this factorizes as :math:`\sum_v w_{vn} g_{vn}^2 (x_n^2)^\top`;
    otherwise the outer-product sums are materialized in chunks of vectors.

    Args:
        g: ``[V, N, G, T, O]`` output vectors.
        x: ``[N, G, T, I]`` inputs.
        weights: ``[V, N]`` or ``None`` (all ones).
        per_example: Keep the example axis.

    Returns:
        ``[N, G, O, I]`` if ``per_example`` else ``[G, O, I]``.
    """
    v, n, groups, t, o = g.shape
    if t == 1:
        g_sq = square_sum(g[:, :, :, 0], weights)  # [N, G, O]
        x_sq = x[:, :, 0].square()  # [N, G, I]
        if per_example:
            return g_sq[..., None] * x_sq[:, :, None, :]
        if groups == 1:
            return torch.mm(g_sq[:, 0].t(), x_sq[:, 0]).unsqueeze(0)
        return torch.bmm(g_sq.permute(1, 2, 0), x_sq.transpose(0, 1))
    total = None
    for s in _chunks(v, n * groups * o * x.shape[-1]):
        sq = outer_sums(g[s], x).square_()
        if weights is not None:
            sq.mul_(weights[s, :, None, None, None])
        part = sq.sum(0) if per_example else sq.sum((0, 1))
        total = part if total is None else total.add_(part)
    assert total is not None
    return total


def _flat_positions(x: Tensor) -> Tensor:
    """``[N, *, in] -> [N, T, in]`` with ``T`` the product of the position axes."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


def _grouped(x: Tensor, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """Linear input ``[N, *, I]`` and vectors ``[V, N, *, O]`` as one group: ``[N, 1, T, I]``, ``[V, N, 1, T, O]``."""
    g = grad_output.reshape(*grad_output.shape[:2], 1, -1, grad_output.shape[-1])
    return _flat_positions(x).unsqueeze(1), g


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """Exact per-example quantities of ``nn.Linear`` (any number of position axes)."""

    def per_example_grads(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        """``{name: [V, N, *p.shape]}``: per-example gradients of each vector (see the module docstring)."""
        x, g = _grouped(inputs[0].detach(), grad_output)
        grads: ParamDict = {}
        if module.weight.requires_grad:
            grads["weight"] = outer_sums(g, x).squeeze(2)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = g.sum((2, 3))
        return grads

    def weighted_squared_sum(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        per_example: bool,
    ) -> ParamDict:
        r"""``{name: [N, *p] or p.shape}``: :math:`\sum_v w_{vn} (g^{(v)}_n)^2` (over ``n`` unless ``per_example``).

        For ``[N, in]`` inputs both parameters come from :math:`s_n = \sum_v w_{vn} g_{vn}^2`:
        the weight's is :math:`s_n (x_n^2)^\top` (one matrix product when summed over ``n``),
        the bias's is :math:`s_n`.
        """
        x = inputs[0].detach()
        result: ParamDict = {}
        if x.dim() == 2:
            g_sq = square_sum(grad_output, weights)  # [N, O]
            if module.weight.requires_grad:
                x_sq = x.square()
                result["weight"] = g_sq.unsqueeze(2) * x_sq.unsqueeze(1) if per_example else torch.mm(g_sq.t(), x_sq)
            if module.bias is not None and module.bias.requires_grad:
                result["bias"] = g_sq if per_example else g_sq.sum(0)
            return result
        x, g = _grouped(x, grad_output)
        if module.weight.requires_grad:
            result["weight"] = outer_sum_weighted_squares(g, x, weights, per_example).squeeze(-3)
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = weighted_square_reduce(g.sum((2, 3)), weights, per_example)
        return result

    def squared_norms(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        r"""``{name: [V, N]}``: :math:`\|g^{(v)}_n\|^2` per parameter tensor.

        For ``[N, in]`` inputs the weight's is :math:`\|g_{vn}\|^2 \|x_n\|^2`, as in
        :func:`outer_sum_squared_norms`, with :math:`\|g_{vn}\|^2` computed once for both
        parameters (a few percent of ``T0`` on the benchmark MLPs).
        """
        x = inputs[0].detach()
        result: ParamDict = {}
        if x.dim() == 2:
            g_norms = torch.linalg.vector_norm(grad_output, dim=-1).square_()  # [V, N]
            if module.weight.requires_grad:
                result["weight"] = g_norms * torch.linalg.vector_norm(x, dim=-1).square_()
            if module.bias is not None and module.bias.requires_grad:
                result["bias"] = g_norms
            return result
        x, g = _grouped(x, grad_output)
        if module.weight.requires_grad:
            result["weight"] = outer_sum_squared_norms(g, x)
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = g.sum(3).square().sum((2, 3))
        return result

    def output_curvature(
        self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor, per_example: bool
    ) -> ParamDict:
        r"""``{name: [N, *p] or p.shape}``: :math:`\sum_e r_{ne} (\partial \mathrm{out}_{ne} / \partial\theta)^2`."""
        x_sq = _flat_positions(inputs[0].detach()).square()
        r = rearrange(output_weights, "n ... o -> n (...) o")
        result: ParamDict = {}
        if module.weight.requires_grad:
            pattern = "n t o, n t i -> n o i" if per_example else "n t o, n t i -> o i"
            result["weight"] = einsum(r, x_sq, pattern)
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = r.sum(1) if per_example else r.sum((0, 1))
        return result

    def input_curvature(self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor) -> Tensor:
        r"""``[N, *, in]``: :math:`\sum_o r_{n\ldots o} W_{oi}^2`.

        The input Jacobian is :math:`W` at every position.
        """
        return output_weights @ module.weight.detach().square()

    def input_vjp(self, module: nn.Module, inputs: Sequence[Tensor], vectors: Tensor) -> Tensor:
        """``[V, N, *, in]``: :math:`v W` at every position."""
        return vectors @ module.weight.detach()

    def kronecker_input(
        self, module: nn.Module, inputs: Sequence[Tensor], sharing: WeightSharing, fold_bias: bool
    ) -> Tensor:
        """``[1, I', I']``: the input factor over the positions of ``[N, *, I]`` inputs.

        See ``secorder_hooks.rules.kronecker``.
        """
        return input_moment(_flat_positions(inputs[0].detach()).unsqueeze(1), fold_bias, sharing)

    def kronecker_output(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        sharing: WeightSharing,
    ) -> Tensor:
        """``[1, O, O]``: the output factor of vectors ``[V, N, *, O]``."""
        _, g = _grouped(inputs[0], grad_output)
        return output_moment(g, weights, sharing)

    def touches_one_output(self, module: nn.Module, inputs: Sequence[Tensor]) -> bool:
        """True for ``[N, in]`` inputs: ``W[o, i]`` and ``b[o]`` only reach ``out[n, o]``."""
        return inputs[0].dim() == 2
