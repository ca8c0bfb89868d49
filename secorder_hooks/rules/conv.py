r"""Rules for :class:`torch.nn.Conv1d`, :class:`~torch.nn.Conv2d` and :class:`~torch.nn.Conv3d`.

A convolution is a grouped linear map of input patches: with the input padded (in the
module's ``padding_mode``) and unfolded into patches :math:`X_{ngp} \in \mathbb{R}^{C_g K}`
at output locations ``p`` of group ``g``,

.. math:: \mathrm{out}_{n, g o, p} = W_{g o} X_{ngp} + b_{g o},

so the per-example gradient of a vector :math:`v` at the output is
:math:`\sum_p v_{ngp} X_{ngp}^\top` (all locations, cross-location terms included in every
square) and :math:`\sum_p v_{n,o,p}` for the bias. Every option of the modules is
supported: ``stride``, ``dilation``, ``groups``, integer or ``'same'``/``'valid'``
padding, any ``padding_mode`` and ``bias=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from secorder_hooks.errors import UnsupportedModuleError
from secorder_hooks.rules.base import LayerRule, ParamDict, register_rule
from secorder_hooks.rules.linear import outer_sum_squared_norms, outer_sum_weighted_squares, outer_sums

__all__ = ["ConvRule", "conv_padding", "unfold_patches"]


def conv_padding(module: nn.modules.conv._ConvNd) -> list[int]:
    """The module's padding as an :func:`torch.nn.functional.pad` argument (last spatial dim first).

    ``'same'`` puts the extra element of an odd total padding on the right, as PyTorch does.
    """
    pads: list[int] = []
    for i in reversed(range(len(module.kernel_size))):
        if module.padding == "valid":
            left = right = 0
        elif module.padding == "same":
            total = module.dilation[i] * (module.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2
        else:
            left = right = module.padding[i]
        pads += [left, right]
    return pads


def unfold_patches(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    r"""Input patches of every output location, grouped: ``[N, G, P, C_in/G * prod(kernel)]``.

    The patch layout matches ``weight[o].flatten()`` (channel, then kernel positions), so
    ``out[n, g*O_g + o, p] = weight[g*O_g + o].flatten() @ patches[n, g, p] + bias``.

    Args:
        module: The convolution.
        x: ``[N, C_in, *S]`` input of the call.

    Returns:
        ``[N, G, P, C_in/G * prod(kernel)]`` with ``P`` the number of output locations.
    """
    d = len(module.kernel_size)
    if x.dim() != d + 2:
        raise UnsupportedModuleError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-example quantities need a "
            f"batched input [N, C, *spatial] with {d} spatial dims (add a batch dimension)."
        )
    pads = conv_padding(module)
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)  # appends the window axis
        if dil > 1:
            x = x[..., ::dil]
    # x: [N, C, *O, *K]
    x = x.unflatten(1, (module.groups, -1))  # [N, G, C_g, *O, *K]
    spatial = list(range(3, 3 + d))
    kernel = list(range(3 + d, 3 + 2 * d))
    x = x.permute(0, 1, *spatial, 2, *kernel)  # [N, G, *O, C_g, *K]
    out_locations = prod(x.shape[2 : 2 + d])
    return x.reshape(x.shape[0], module.groups, out_locations, -1)


def _grouped_vectors(module: nn.modules.conv._ConvNd, grad_output: Tensor) -> Tensor:
    """``[V, N, C_out, *O] -> [V, N, G, P, C_out/G]``."""
    return rearrange(grad_output, "v n (g o) ... -> v n g (...) o", g=module.groups)


@register_rule(nn.Conv1d)
@register_rule(nn.Conv2d)
@register_rule(nn.Conv3d)
class ConvRule(LayerRule):
    """Exact per-example quantities of ``nn.Conv1d/2d/3d`` from unfolded input patches.

    Per-example gradients and weighted squared sums materialize ``[v, N, *weight.shape]``
    in chunks of vectors; squared norms use the Gram trick over output locations when it
    needs fewer flops; :meth:`output_curvature` is a closed form over squared patches.
    """

    def per_example_grads(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        """``{name: [V, N, *p.shape]}``: per-example gradients of each vector (see the module docstring)."""
        grads: ParamDict = {}
        if module.weight.requires_grad:
            x = unfold_patches(module, inputs[0].detach())
            g = _grouped_vectors(module, grad_output)
            grads["weight"] = outer_sums(g, x).reshape(*grad_output.shape[:2], *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            grads["bias"] = grad_output.flatten(3).sum(-1)
        return grads

    def weighted_squared_sum(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        per_example: bool,
    ) -> ParamDict:
        r"""``{name: [N, *p] or p.shape}``: :math:`\sum_v w_{vn} (g^{(v)}_n)^2` (over ``n`` unless ``per_example``)."""
        result: ParamDict = {}
        if module.weight.requires_grad:
            x = unfold_patches(module, inputs[0].detach())
            g = _grouped_vectors(module, grad_output)
            sq = outer_sum_weighted_squares(g, x, weights, per_example)
            result["weight"] = sq.reshape(*sq.shape[: 1 if per_example else 0], *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            b_sq = grad_output.flatten(3).sum(-1).square()
            if weights is not None:
                b_sq = b_sq * weights.unsqueeze(-1)
            result["bias"] = b_sq.sum(0) if per_example else b_sq.sum((0, 1))
        return result

    def squared_norms(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        r"""``{name: [V, N]}``: :math:`\|g^{(v)}_n\|^2` per parameter tensor."""
        result: ParamDict = {}
        if module.weight.requires_grad:
            x = unfold_patches(module, inputs[0].detach())
            result["weight"] = outer_sum_squared_norms(_grouped_vectors(module, grad_output), x)
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = grad_output.flatten(3).sum(-1).square().sum(-1)
        return result

    def output_curvature(
        self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor, per_example: bool
    ) -> ParamDict:
        r""":math:`\sum_{p} r_{n,go,p} X_{ngp}^2` (each output element depends on one weight row)."""
        result: ParamDict = {}
        if module.weight.requires_grad:
            x_sq = unfold_patches(module, inputs[0].detach()).square()
            r = _grouped_vectors(module, output_weights.unsqueeze(0))[0]  # [N, G, P, O_g]
            pattern = "n g p o, n g p i -> n g o i" if per_example else "n g p o, n g p i -> g o i"
            curv = einsum(r, x_sq, pattern)
            result["weight"] = curv.reshape(*curv.shape[: 1 if per_example else 0], *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            r_sum = output_weights.flatten(2).sum(-1)
            result["bias"] = r_sum if per_example else r_sum.sum(0)
        return result
