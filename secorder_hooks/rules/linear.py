r"""Rule for :class:`torch.nn.Linear` on inputs ``[N, *, in]``.

With :math:`y_{nt} = W x_{nt} + b` over positions ``t`` of example ``n`` (none for 2-D
input), the per-example gradients of a vector :math:`g` at the output are
:math:`\sum_t g_{nt} x_{nt}^\top` and :math:`\sum_t g_{nt}`. For 2-D inputs the squared
sums and norms factorize and never materialize ``[V, N, out, in]``.
"""

from __future__ import annotations

from collections.abc import Sequence


from einops import einsum, rearrange
from torch import Tensor, nn

from secorder_hooks.rules.base import LayerRule, ParamDict, register_rule


def _flat_positions(x: Tensor) -> Tensor:
    """``[N, *, in] -> [N, T, in]`` with ``T`` the product of the position axes."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


@register_rule(nn.Linear)
class LinearRule(LayerRule):
    """Exact per-example quantities of ``nn.Linear`` (any number of position axes)."""

    def per_example_grads(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        x = _flat_positions(inputs[0])
        g = grad_output.reshape(*grad_output.shape[:2], -1, grad_output.shape[-1])
        grads: ParamDict = {}
        if module.weight.requires_grad:
            grads["weight"] = einsum(g, x, "v n t o, n t i -> v n o i")
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = g.sum(2)
        return grads

    def weighted_squared_sum(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        per_example: bool,
    ) -> ParamDict:
        if inputs[0].dim() != 2:
            return super().weighted_squared_sum(module, inputs, grad_output, weights, per_example)
        x = inputs[0]
        g_sq = grad_output.square()
        if weights is not None:
            g_sq = g_sq * weights.unsqueeze(-1)
        g_sq = g_sq.sum(0)  # [N, out]
        result: ParamDict = {}
        if module.weight.requires_grad:
            if per_example:
                result["weight"] = einsum(g_sq, x.square(), "n o, n i -> n o i")
            else:
                result["weight"] = g_sq.T @ x.square()
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = g_sq if per_example else g_sq.sum(0)
        return result

    def squared_norms(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        if inputs[0].dim() != 2:
            return super().squared_norms(module, inputs, grad_output)
        g_norm = grad_output.square().sum(-1)  # [V, N]
        result: ParamDict = {}
        if module.weight.requires_grad:
            result["weight"] = g_norm * inputs[0].square().sum(-1)
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = g_norm
        return result

    def output_curvature(
        self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor, per_example: bool
    ) -> ParamDict:
        x_sq = _flat_positions(inputs[0]).square()
        r = rearrange(output_weights, "n ... o -> n (...) o")
        result: ParamDict = {}
        if module.weight.requires_grad:
            pattern = "n t o, n t i -> n o i" if per_example else "n t o, n t i -> o i"
            result["weight"] = einsum(r, x_sq, pattern)
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = r.sum(1) if per_example else r.sum((0, 1))
        return result


__all__ = ["LinearRule"]
