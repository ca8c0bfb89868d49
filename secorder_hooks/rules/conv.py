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

import torch
import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn

from secorder_hooks.errors import UnsupportedModuleError
from secorder_hooks.quantities import WeightSharing
from secorder_hooks.rules.base import LayerRule, ParamDict, register_rule, weighted_square_reduce
from secorder_hooks.rules.kronecker import input_moment_rows, output_moment
from secorder_hooks.rules.linear import _chunks, outer_sum_squared_norms, outer_sum_weighted_squares, outer_sums

__all__ = ["ConvRule", "conv_padding", "grouped_weight_grads", "patch_rows", "shifted_weight_grads", "unfold_patches"]


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


def _op_padding(module: nn.modules.conv._ConvNd, pads: list[int]) -> list[int] | None:
    """The convolution operators' ``padding`` argument (first spatial axis first) for ``pads``, if they can take it.

    ``None`` where the padding is not zeros, or not equal on both sides of an axis: then it
    must be applied by ``F.pad`` first.
    """
    d = len(module.kernel_size)
    if module.padding_mode != "zeros" or any(pads[2 * i] != pads[2 * i + 1] for i in range(d)):
        return None
    return [pads[2 * (d - 1 - i)] for i in range(d)]


def _op_input(module: nn.modules.conv._ConvNd, x: Tensor, pads: list[int]) -> tuple[Tensor, list[int]]:
    """``x`` and the operators' ``padding`` argument (``x`` padded by ``F.pad`` where they cannot take ``pads``)."""
    padding = _op_padding(module, pads)
    if padding is not None:
        return x, padding
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode), [0] * len(module.kernel_size)


def _convolution_backward(
    module: nn.modules.conv._ConvNd,
    grad_output: Tensor,
    x: Tensor,
    weight: Tensor,
    padding: list[int],
    groups: int,
    output_mask: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``torch.ops.aten.convolution_backward`` with the module's stride and dilation (no bias, not transposed)."""
    return torch.ops.aten.convolution_backward(
        grad_output,
        x,
        weight,
        None,
        list(module.stride),
        padding,
        list(module.dilation),
        False,
        [0] * len(module.kernel_size),
        groups,
        output_mask,
    )


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
    _check_batched(module, x)
    d = len(module.kernel_size)
    if d == 2:
        return _unfold_2d(module, x, conv_padding(module))
    x = _window_view(module, x)  # [N, G, C_g, *O, *K]
    spatial = list(range(3, 3 + d))
    kernel = list(range(3 + d, 3 + 2 * d))
    x = x.permute(0, 1, *spatial, 2, *kernel)  # [N, G, *O, C_g, *K]
    out_locations = prod(x.shape[2 : 2 + d])
    return x.reshape(x.shape[0], module.groups, out_locations, -1)


def patch_rows(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    r"""The patches of :func:`unfold_patches` with the output locations last: ``[G, C_in/G * prod(kernel), N, P]``.

    ``patch_rows(module, x)[g, i, n, p] == unfold_patches(module, x)[n, g, p, i]``, built by
    one copy from a strided view of the (padded) input, whose innermost axis runs along
    the input's last spatial axis. In this layout the second moment over examples and
    locations is a product of two operands contiguous along the summed axis; forming it
    from the im2col layout needed an element-wise transposing copy of all patches (on
    problem B of the benchmarks: 2.4 against 5.1 ms for ``Conv2d(3, 16, 3)``, 6.6 against
    10.6 ms for ``Conv2d(16, 32, 3)``).

    Args:
        module: The convolution.
        x: ``[N, C_in, *S]`` input of the call.
    """
    _check_batched(module, x)
    d = len(module.kernel_size)
    n = x.shape[0]
    view = _window_view(module, x)  # [N, G, C_g, *O, *K]
    out_locations = prod(view.shape[3 : 3 + d])
    kernel = list(range(3 + d, 3 + 2 * d))
    view = view.permute(1, 2, *kernel, 0, *range(3, 3 + d))  # [G, C_g, *K, N, *O]
    return view.reshape(module.groups, -1, n, out_locations)


def _check_batched(module: nn.modules.conv._ConvNd, x: Tensor) -> None:
    """Raise unless ``x`` is ``[N, C, *spatial]`` with the module's number of spatial dims."""
    d = len(module.kernel_size)
    if x.dim() != d + 2:
        raise UnsupportedModuleError(
            f"{type(module).__name__} got an input of shape {tuple(x.shape)}; per-example quantities need a "
            f"batched input [N, C, *spatial] with {d} spatial dims (add a batch dimension)."
        )


def _window_view(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``[N, G, C_g, *O, *K]``: the patches as a strided view of the input (padded by ``F.pad`` in a copy first)."""
    pads = conv_padding(module)
    if any(pads):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pads, mode=mode)
    for i, (k, s, dil) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)  # appends the window axis
        if dil > 1:
            x = x[..., ::dil]
    return x.unflatten(1, (module.groups, -1))


def _unfold_2d(module: nn.modules.conv._ConvNd, x: Tensor, pads: list[int]) -> Tensor:
    """:func:`unfold_patches` of a 2-D convolution by :func:`torch.nn.functional.unfold` (im2col).

    The result is a transposed view of the contiguous ``[N, G, C_g * kh * kw, P]`` patches,
    which batched matrix products read without a copy.
    """
    x, padding = _op_input(module, x, pads)
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
    return cols.unflatten(1, (module.groups, -1)).transpose(-1, -2)


def shifted_weight_grads(module: nn.modules.conv._ConvNd, x: Tensor, grad_output: Tensor) -> Tensor | None:
    r"""Per-example weight gradients of a stride-1 :class:`~torch.nn.Conv2d` without unfolding patches.

    With the padded input flattened row by row (row length :math:`W_p`) and the output
    vectors zero-padded from :math:`W'` to :math:`W_p` columns, the patch entry of kernel
    offset :math:`(i, j)` at output location :math:`t` is the flat input at
    :math:`t + i d_h W_p + j d_w`: a contiguous window. So

    .. math:: G_{n, o, c, i, j} = \sum_t \tilde v_{n o t}\, \tilde x_{n c, t + i d_h W_p + j d_w},

    one batched matrix product per kernel offset on views (the zero columns cancel the
    windows' wrap-around). No ``[N, C K, P]`` patch tensor is formed.

    Args:
        module: The convolution.
        x: ``[N, C_in, H, W]`` input of the call.
        grad_output: ``[V, N, C_out, H', W']`` vectors at the output.

    Returns:
        ``[V, N, *weight.shape]``, or ``None`` where the module is not a stride-1 ``Conv2d``
        on a batched input (use :func:`unfold_patches`).
    """
    if not _shifted_applies(module, x, vectors=1):
        return None
    v, n, c_out, h_out, w_out = grad_output.shape
    groups, (kh, kw), (dh, dw) = module.groups, module.kernel_size, module.dilation
    pads = conv_padding(module)
    if module.padding_mode == "zeros":
        padded = F.pad(x, (*pads[:3], pads[3] + 1))  # one spare row: the last window overruns
    else:
        padded = F.pad(F.pad(x, pads, mode=module.padding_mode), (0, 0, 0, 1))
    wp = padded.shape[-1]
    t = h_out * wp
    o_g, c_g = c_out // groups, x.shape[1] // groups
    vectors = F.pad(grad_output, (0, wp - w_out)).reshape(v, n * groups, o_g, t)
    vectors = vectors.permute(1, 0, 2, 3).reshape(n * groups, v * o_g, t)  # a view for V = 1
    flat = padded.reshape(n * groups, c_g, -1)
    windows = [flat[:, :, i * dh * wp + j * dw :][:, :, :t] for i in range(kh) for j in range(kw)]
    vectors = vectors.transpose(1, 2)
    grads = torch.stack([torch.bmm(w, vectors) for w in windows], -1)  # [N G, C_g, V O_g, K]
    grads = grads.reshape(n, groups, c_g, v, o_g, kh, kw).permute(3, 0, 1, 4, 2, 5, 6)
    return grads.reshape(v, n, *module.weight.shape)


def grouped_weight_grads(module: nn.modules.conv._ConvNd, x: Tensor, grad_output: Tensor) -> Tensor:
    r"""Per-example weight gradients as the weight gradient of one convolution with the examples as groups.

    Stacking the ``N`` examples along the channel axis of a batch of one and using ``N G``
    groups, group :math:`(n, g)` sees exactly example ``n``'s input channels of group ``g``
    and its output vectors, so the convolution's own weight gradient
    (``torch.ops.aten.convolution_backward``) is the stack of per-example gradients. The
    ``V`` vectors are folded into the output channels of each group.

    Args:
        module: The convolution.
        x: ``[N, C_in, *S]`` input of the call.
        grad_output: ``[V, N, C_out, *O]`` vectors at the output.

    Returns:
        ``[V, N, *weight.shape]``.
    """
    v, n, c_out = grad_output.shape[:3]
    groups = module.groups
    x, padding = _op_input(module, x, conv_padding(module))
    o_g, c_g = c_out // groups, x.shape[1] // groups
    out_sizes = grad_output.shape[3:]
    vectors = grad_output.reshape(v, n * groups, o_g, *out_sizes).transpose(0, 1)  # a view for V = 1
    vectors = vectors.reshape(1, n * groups * v * o_g, *out_sizes)
    weight = x.new_empty(n * groups * v * o_g, c_g, *module.kernel_size)  # only its shape is read
    _, grads, _ = _convolution_backward(
        module, vectors, x.reshape(1, n * x.shape[1], *x.shape[2:]), weight, padding, n * groups, [False, True, False]
    )
    grads = grads.reshape(n * groups, v, o_g, c_g, *module.kernel_size).transpose(0, 1)
    return grads.reshape(v, n, *module.weight.shape)


#: Input channels per group from which :func:`grouped_weight_grads` beats the alternatives.
GROUPED_MIN_CHANNELS = 8


def _shifted_applies(module: nn.modules.conv._ConvNd, x: Tensor, vectors: int) -> bool:
    """Whether :func:`shifted_weight_grads` applies and pays: one vector (more need strided copies)."""
    return vectors == 1 and isinstance(module, nn.Conv2d) and tuple(module.stride) == (1, 1) and x.dim() == 4


def _grouped_applies(module: nn.modules.conv._ConvNd, x: Tensor) -> bool:
    """Whether :func:`grouped_weight_grads` pays: a batched input with many channels per group."""
    return x.dim() == len(module.kernel_size) + 2 and x.shape[1] // module.groups >= GROUPED_MIN_CHANNELS


def _direct_applies(module: nn.modules.conv._ConvNd, x: Tensor, vectors: int) -> bool:
    """Whether per-example gradients are formed without patches (then materializing them is cheapest)."""
    return _grouped_applies(module, x) or _shifted_applies(module, x, vectors)


def _weight_grads(module: nn.modules.conv._ConvNd, x: Tensor, grad_output: Tensor) -> Tensor:
    """``[V, N, *weight.shape]`` by the fastest applicable method."""
    if _grouped_applies(module, x):
        return grouped_weight_grads(module, x, grad_output)
    if _shifted_applies(module, x, grad_output.shape[0]):
        return shifted_weight_grads(module, x, grad_output)
    g = _grouped_vectors(module, grad_output)
    return outer_sums(g, unfold_patches(module, x)).reshape(*grad_output.shape[:2], *module.weight.shape)


def _gram_is_cheaper(g: Tensor, patch_size: int) -> bool:
    """Whether the Gram trick of :func:`~secorder_hooks.rules.linear.outer_sum_squared_norms` needs fewer flops."""
    v, n, groups, t, o = g.shape
    return n * groups * t * t * (patch_size + v * o) < v * n * groups * t * o * patch_size


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
            grads["weight"] = _weight_grads(module, inputs[0].detach(), grad_output)
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
            x = inputs[0].detach()
            if _direct_applies(module, x, grad_output.shape[0]):
                result["weight"] = self._direct_weighted_squares(module, x, grad_output, weights, per_example)
            else:
                g = _grouped_vectors(module, grad_output)
                sq = outer_sum_weighted_squares(g, unfold_patches(module, x), weights, per_example)
                result["weight"] = sq.reshape(*sq.shape[: 1 if per_example else 0], *module.weight.shape)
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = weighted_square_reduce(grad_output.flatten(3).sum(-1), weights, per_example)
        return result

    def squared_norms(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        r"""``{name: [V, N]}``: :math:`\|g^{(v)}_n\|^2` per parameter tensor."""
        result: ParamDict = {}
        if module.weight.requires_grad:
            x = inputs[0].detach()
            g = _grouped_vectors(module, grad_output)
            patch_size = module.weight[0].numel()
            if _direct_applies(module, x, grad_output.shape[0]) and not _gram_is_cheaper(g, patch_size):
                result["weight"] = torch.cat(
                    [
                        _weight_grads(module, x, grad_output[s]).flatten(2).square_().sum(-1)
                        for s in _chunks(g.shape[0], g.shape[1] * module.weight.numel())
                    ]
                )
            else:
                result["weight"] = outer_sum_squared_norms(g, unfold_patches(module, x))
        if module.bias is not None and module.bias.requires_grad:
            result["bias"] = grad_output.flatten(3).sum(-1).square().sum(-1)
        return result

    @staticmethod
    def _direct_weighted_squares(
        module: nn.modules.conv._ConvNd, x: Tensor, grad_output: Tensor, weights: Tensor | None, per_example: bool
    ) -> Tensor:
        r""":math:`\sum_v w_{vn} G_{vn}^2` from materialized per-example gradients, in chunks of vectors."""
        v, n = grad_output.shape[:2]
        total = None
        for s in _chunks(v, n * module.weight.numel()):
            sq = _weight_grads(module, x, grad_output[s]).square_()
            if weights is not None:
                sq.mul_(weights[s].reshape(*weights[s].shape, *([1] * (sq.dim() - 2))))
            part = sq.sum(0) if per_example else sq.sum((0, 1))
            total = part if total is None else total.add_(part)
        assert total is not None
        return total

    def input_vjp(self, module: nn.Module, inputs: Sequence[Tensor], vectors: Tensor) -> Tensor | None:
        """``[V, N, C_in, *S]``: the input gradient of the convolution for each vector (``V`` folded into ``N``).

        ``None`` for padding that is not zeros on both sides of every axis (applied by a
        separate padding operation).
        """
        x = inputs[0]
        padding = _op_padding(module, conv_padding(module))
        if padding is None or x.dim() != len(module.kernel_size) + 2:
            return None
        v, n = vectors.shape[:2]
        grad, _, _ = _convolution_backward(
            module,
            vectors.reshape(v * n, *vectors.shape[2:]),
            x.new_zeros(()).expand(v * n, *x.shape[1:]),  # only its shape is read
            module.weight.detach(),
            padding,
            module.groups,
            [True, False, False],
        )
        return grad.reshape(v, n, *x.shape[1:])

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

    def kronecker_input(
        self, module: nn.Module, inputs: Sequence[Tensor], sharing: WeightSharing, fold_bias: bool
    ) -> Tensor:
        """``[G, I', I']``: the input factor over the unfolded patches, output locations as positions."""
        return input_moment_rows(patch_rows(module, inputs[0].detach()), fold_bias, sharing)

    def kronecker_output(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        sharing: WeightSharing,
    ) -> Tensor:
        """``[G, O/G, O/G]``: the output factor of vectors ``[V, N, C_out, *O]``, output locations as positions."""
        return output_moment(_grouped_vectors(module, grad_output), weights, sharing)
