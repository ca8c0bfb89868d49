r"""Second moments that make the Kronecker factors of Linear and convolution layers.

Both layer types are grouped linear maps of inputs at positions (see
:mod:`secorder_hooks.rules.linear`): ``x`` ``[N, G, T, I]`` (a Linear layer's input with
its leading axes flattened to ``T``, one group; a convolution's unfolded patches) and
vectors ``g`` ``[V, N, G, T, O]`` at the output. The factors of
:class:`~secorder_hooks.quantities.KroneckerQuantity` are, per group,

.. math::
    A = \frac{1}{N T} \sum_{n,t} a_{nt} a_{nt}^\top, \quad
    B = \sum_{v,n,t} w_{vn}\, g_{vnt} g_{vnt}^\top \qquad \text{(expand)},

    A = \frac{1}{N} \sum_{n} \bar a_n \bar a_n^\top, \quad
    B = \sum_{v,n} w_{vn}\, \bar g_{vn} \bar g_{vn}^\top, \quad
    \bar a_n = \frac1T \sum_t a_{nt}, \ \bar g_{vn} = \sum_t g_{vnt} \qquad \text{(reduce)},

with :math:`a = (x, 1)` when the layer has a trainable bias (the bias coordinate last).
"""

from __future__ import annotations

import torch
from einops import rearrange, reduce
from torch import Tensor

from secorder_hooks.quantities import WeightSharing

__all__ = ["input_moment", "input_moment_rows", "output_moment"]


def input_moment(x: Tensor, bias: bool, sharing: WeightSharing) -> Tensor:
    """``[G, I', I']``: the factor :math:`A` of grouped inputs ``x`` ``[N, G, T, I]`` (``I' = I + 1`` with ``bias``).

    The scaling happens inside the batched matrix product, which writes a fresh contiguous
    result (writing into a block of a larger one took 1.7 times as long on ``[128, 784]``).
    """
    n, t = x.shape[0], x.shape[2]
    if sharing is WeightSharing.REDUCE:
        x = reduce(x, "n g t i -> n g 1 i", "mean")
        t = 1
    if bias:
        x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
    flat = rearrange(x, "n g t i -> g (n t) i")
    out = flat.new_empty(flat.shape[0], flat.shape[-1], flat.shape[-1])
    return torch.baddbmm(out, flat.transpose(1, 2), flat, beta=0, alpha=1.0 / (n * t))


def input_moment_rows(rows: Tensor, bias: bool, sharing: WeightSharing) -> Tensor:
    r"""``[G, I', I']``: the factor :math:`A` of grouped inputs given with positions last, ``rows`` ``[G, I, N, T]``.

    Equals :func:`input_moment` of ``rows.permute(2, 0, 3, 1)`` (``[N, G, T, I]``). The product
    reads both operands along their contiguous last axis (convolution patches from
    :func:`~secorder_hooks.rules.conv.patch_rows`). With ``bias`` the result is built
    blockwise in one output, :math:`A' = [[A, \bar a], [\bar a^\top, 1]]` with
    :math:`\bar a` the mean of the inputs, without copying the inputs to append the constant
    coordinate (1.2 to 1.3 times faster for the patches of problem B's convolutions).
    """
    g, i, n, t = rows.shape
    if sharing is WeightSharing.REDUCE:
        rows = rows.mean(-1, keepdim=True)
        t = 1
    flat = rows.reshape(g, i, n * t)
    alpha = 1.0 / (n * t)
    if not bias:
        return torch.baddbmm(flat.new_empty(g, i, i), flat, flat.transpose(1, 2), beta=0, alpha=alpha)
    out = flat.new_empty(g, i + 1, i + 1)
    top = out[:, :i, :i]
    torch.baddbmm(top, flat, flat.transpose(1, 2), beta=0, alpha=alpha, out=top)
    mean = flat.mean(-1)
    out[:, :i, i] = mean
    out[:, i, :i] = mean
    out[:, i, i] = 1.0
    return out


def output_moment(g: Tensor, weights: Tensor | None, sharing: WeightSharing) -> Tensor:
    """``[G, O, O]``: the factor :math:`B` of vectors ``g`` ``[V, N, G, T, O]`` with weights ``[V, N]`` or ``None``."""
    if sharing is WeightSharing.REDUCE:
        g = g.sum(3, keepdim=True)
    flat = rearrange(g, "v n g t o -> g (v n t) o")
    if weights is None:
        return torch.bmm(flat.transpose(1, 2), flat)
    t = g.shape[3]
    w = rearrange(weights.expand(*g.shape[:2]), "v n -> (v n)").repeat_interleave(t)
    return torch.bmm((flat * w[None, :, None]).transpose(1, 2), flat)
