r"""Rule for :class:`torch.nn.Embedding` on index tensors ``[N, *]``.

With :math:`\mathrm{out}_{nt} = W_{i_{nt}}` over positions ``t`` of example ``n``, the
per-example gradient of a vector :math:`v` at the output is the row-wise segment sum
:math:`(\nabla_W)_{n e} = \sum_{t : i_{nt} = e} v_{nt}`, zero in row ``padding_idx`` (as
PyTorch's embedding backward gives). With ``scale_grad_by_freq`` every position is divided
by the frequency of its index in the whole batch, as PyTorch does, so the per-example
gradients still sum to ``.grad``.

Reductions never form the dense ``[V, N, num_embeddings, D]`` tensor: squares are taken of
the segment sums over the (example, index) pairs that occur, at most ``N * T`` of them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from secorder_hooks.errors import UnsupportedModuleError
from secorder_hooks.quantities import WeightSharing
from secorder_hooks.rules.base import LayerRule, ParamDict, register_rule
from secorder_hooks.rules.kronecker import output_moment

__all__ = ["EmbeddingRule"]


def _check(module: nn.Embedding) -> None:
    if module.max_norm is not None:
        raise UnsupportedModuleError(
            f"nn.Embedding with max_norm={module.max_norm} renormalizes its weight in place during forward, "
            "so the recorded call does not determine the gradient; per-example quantities are not supported. "
            "Construct it with max_norm=None (e.g. renormalize the weight explicitly outside extend())."
        )
    if module.sparse:
        raise UnsupportedModuleError(
            "nn.Embedding with sparse=True produces sparse gradients; per-example quantities are computed "
            "for dense gradients only. Construct it with sparse=False."
        )


class _Positions:
    """Indices ``[N, T]``, their keys ``n * E + index`` and the output vectors per position."""

    def __init__(self, module: nn.Embedding, indices: Tensor, vectors: Tensor) -> None:
        """Flatten positions and apply padding and frequency scaling.

        Args:
            module: The embedding.
            indices: ``[N, *]`` index tensor of the call.
            vectors: ``[V, N, *, D]`` vectors at the output.
        """
        _check(module)
        self.n, self.e = indices.shape[0], module.num_embeddings
        self.index = indices.reshape(self.n, -1)  # [N, T]
        self.key = (self.index + self.e * torch.arange(self.n, device=indices.device).unsqueeze(1)).flatten()
        v = vectors.reshape(vectors.shape[0], -1, vectors.shape[-1])  # [V, N*T, D]
        scale = None
        if module.scale_grad_by_freq:
            counts = torch.bincount(indices.flatten(), minlength=self.e).to(v.dtype)
            scale = counts.reciprocal()[self.index.flatten()]
        if module.padding_idx is not None:
            keep = (self.index.flatten() != module.padding_idx).to(v.dtype)
            scale = keep if scale is None else scale * keep
        self.scale = scale  # [N*T] or None: d out / d weight-row as PyTorch's backward defines it
        self.vectors = v if scale is None else v * scale[:, None]

    def dense(self, per_example: bool) -> Tensor:
        """Scatter ``vectors`` ``[V, N*T, D]`` into rows: ``[V, N, E, D]`` or ``[V, E, D]``."""
        v, _, d = self.vectors.shape
        if per_example:
            out = self.vectors.new_zeros(v, self.n * self.e, d).index_add_(1, self.key, self.vectors)
            return out.reshape(v, self.n, self.e, d)
        return self.vectors.new_zeros(v, self.e, d).index_add_(1, self.index.flatten(), self.vectors)

    def segment_sums(self) -> tuple[Tensor, Tensor]:
        """Sums of ``vectors`` over positions with the same (example, index) key.

        Returns:
            ``[V, U, D]`` sums and the ``[U]`` distinct keys ``n * E + index``.
        """
        keys, inverse = torch.unique(self.key, return_inverse=True)
        v, _, d = self.vectors.shape
        sums = self.vectors.new_zeros(v, keys.numel(), d).index_add_(1, inverse, self.vectors)
        return sums, keys


@register_rule(nn.Embedding)
class EmbeddingRule(LayerRule):
    r"""Exact per-example quantities of ``nn.Embedding`` (dense, without ``max_norm``).

    Kronecker factors: the input of position ``t`` is the scaled one-hot vector
    :math:`a_{nt} = s_{nt} e_{i_{nt}}` (``s`` the padding mask and frequency scale), so the
    weight ``[E, D]`` (rows indexed by the input) gets ``[A, B]``: its block is
    :math:`A \otimes B` for row-major ``W.flatten()``, input factor *first*
    (:attr:`kronecker_input_first`).
    """

    kronecker_input_first = True

    def per_example_grads(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        """``{name: [V, N, *p.shape]}``: per-example gradients of each vector (see the module docstring)."""
        if not module.weight.requires_grad:
            return {}
        return {"weight": _Positions(module, inputs[0], grad_output).dense(per_example=True)}

    def weighted_squared_sum(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        per_example: bool,
    ) -> ParamDict:
        r"""``{name: [N, *p] or p.shape}``: :math:`\sum_v w_{vn} (g^{(v)}_n)^2` (over ``n`` unless ``per_example``)."""
        if not module.weight.requires_grad:
            return {}
        pos = _Positions(module, inputs[0], grad_output)
        sums, keys = pos.segment_sums()
        sq = sums.square()
        if weights is not None:
            sq = sq * weights[:, keys // pos.e, None]
        sq = sq.sum(0)  # [U, D]
        if per_example:
            out = sq.new_zeros(pos.n * pos.e, sq.shape[-1]).index_add_(0, keys, sq)
            return {"weight": out.reshape(pos.n, pos.e, -1)}
        return {"weight": sq.new_zeros(pos.e, sq.shape[-1]).index_add_(0, keys % pos.e, sq)}

    def squared_norms(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        r"""``{name: [V, N]}``: :math:`\|g^{(v)}_n\|^2` per parameter tensor."""
        if not module.weight.requires_grad:
            return {}
        pos = _Positions(module, inputs[0], grad_output)
        sums, keys = pos.segment_sums()
        norms = sums.square().sum(-1)  # [V, U]
        return {"weight": norms.new_zeros(norms.shape[0], pos.n).index_add_(1, keys // pos.e, norms)}

    def output_curvature(
        self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor, per_example: bool
    ) -> ParamDict:
        r""":math:`\sum_{t: i_{nt} = e} r_{nt}`: every output element is one weight entry."""
        if not module.weight.requires_grad:
            return {}
        pos = _Positions(module, inputs[0], output_weights.unsqueeze(0))
        if pos.scale is not None:  # the derivative carries the scale, so its square carries it twice
            pos.vectors = pos.vectors * pos.scale[:, None]
        return {"weight": pos.dense(per_example)[0]}

    def kronecker_input(
        self, module: nn.Module, inputs: Sequence[Tensor], sharing: WeightSharing, fold_bias: bool = False
    ) -> Tensor:
        r"""``[1, E, E]``: the input factor of the scaled one-hot inputs.

        :math:`\frac{1}{NT}\operatorname{diag}(\sum_{n,t} s_{nt}^2 e_{i_{nt}})` (expand) or
        :math:`\frac1N \sum_n \bar a_n \bar a_n^\top` with :math:`\bar a_n = \frac1T \sum_t a_{nt}` (reduce).
        """
        indices = inputs[0]
        pos = _Positions(module, indices, module.weight.new_zeros(1, *indices.shape, 1))
        n, t = pos.index.shape
        flat = pos.index.flatten()
        scale = pos.scale
        if scale is None:
            scale = torch.ones(flat.numel(), dtype=module.weight.dtype, device=flat.device)
        if sharing is WeightSharing.EXPAND:
            diag = scale.new_zeros(pos.e).index_add_(0, flat, scale.square()).div_(n * t)
            return torch.diag(diag).unsqueeze(0)
        mean = scale.new_zeros(n * pos.e).index_add_(0, pos.key, scale).reshape(n, pos.e).div_(t)
        return (mean.T @ mean).div_(n).unsqueeze(0)

    def kronecker_output(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        sharing: WeightSharing,
    ) -> Tensor:
        """``[1, D, D]``: the output factor of vectors ``[V, N, *, D]`` over positions."""
        g = grad_output.reshape(*grad_output.shape[:2], 1, -1, grad_output.shape[-1])
        return output_moment(g, weights, sharing)
