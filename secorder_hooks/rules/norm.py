r"""Rules for normalization layers with an elementwise affine transform.

Each layer computes :math:`\mathrm{out} = \hat x \odot w + b`, where the normalized input
:math:`\hat x` does not depend on the layer's parameters and ``w``, ``b`` broadcast over
some axes. Flattening those axes into positions ``t`` and the parameter axes into ``f``,
the per-example gradients of a vector :math:`v` at the output are

.. math:: (\nabla_w)_{nf} = \sum_t v_{ntf} \hat x_{ntf}, \qquad (\nabla_b)_{nf} = \sum_t v_{ntf}.

* :class:`~torch.nn.LayerNorm` / :class:`~torch.nn.RMSNorm`: ``f`` = the normalized
  (trailing) shape, ``t`` = leading non-batch axes.
* :class:`~torch.nn.GroupNorm`: ``f`` = channels (dim 1), ``t`` = spatial axes.
* ``BatchNorm1d/2d/3d`` in eval mode with running statistics:
  :math:`\hat x = (x - \mu_{\mathrm{run}}) / \sqrt{\sigma^2_{\mathrm{run}} + \epsilon}`, ``f`` = channels.
  Batch statistics mix the examples, so training mode (refused by the engine) and
  ``track_running_stats=False`` raise :class:`~secorder_hooks.errors.UnsupportedModuleError`.

Layers without affine parameters own no trainable parameters and need nothing.
The per-example results are only ``[V, N, *p]`` (small), so the squared sums and norms
use the materializing defaults; :meth:`AffineNormRule.output_curvature` is a closed form.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from einops import einsum, rearrange
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from secorder_hooks.errors import UnsupportedModuleError
from secorder_hooks.rules.base import LayerRule, ParamDict, register_rule

__all__ = ["AffineNormRule", "LayerNormRule", "RMSNormRule", "GroupNormRule", "BatchNormEvalRule"]


class AffineNormRule(LayerRule):
    """Shared maths of ``out = normalized(x) * weight + bias``; subclasses say how to normalize and flatten."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        r"""The parameter-free normalized input :math:`\hat x`, shaped like ``x``."""
        raise NotImplementedError

    def check(self, module: nn.Module) -> None:
        """Raise if per-example quantities of ``module`` in its current state are undefined."""

    def positions_last(self, module: nn.Module, t: Tensor) -> Tensor:
        """``[B, N, *out] -> [B, N, T, F]``: positions, then the parameter axes flattened."""
        raise NotImplementedError

    def _normalized_flat(self, module: nn.Module, inputs: Sequence[Tensor]) -> Tensor:
        """``[N, T, F]`` normalized input."""
        return self.positions_last(module, self.normalized(module, inputs[0].detach()).unsqueeze(0))[0]

    @staticmethod
    def _wanted(module: nn.Module) -> tuple[bool, bool]:
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        return (weight is not None and weight.requires_grad, bias is not None and bias.requires_grad)

    def per_example_grads(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        """``{name: [V, N, *p.shape]}``: per-example gradients of each vector (see the module docstring)."""
        self.check(module)
        want_w, want_b = self._wanted(module)
        g = self.positions_last(module, grad_output)  # [V, N, T, F]
        grads: ParamDict = {}
        if want_w:
            xhat = self._normalized_flat(module, inputs)
            grads["weight"] = einsum(g, xhat, "v n t f, n t f -> v n f").reshape(*g.shape[:2], *module.weight.shape)
        if want_b:
            grads["bias"] = g.sum(2).reshape(*g.shape[:2], *module.bias.shape)
        return grads

    def output_curvature(
        self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor, per_example: bool
    ) -> ParamDict:
        r""":math:`\sum_t r_{ntf} \hat x_{ntf}^2` for the weight and :math:`\sum_t r_{ntf}` for the bias."""
        self.check(module)
        want_w, want_b = self._wanted(module)
        r = self.positions_last(module, output_weights.unsqueeze(0))[0]  # [N, T, F]
        lead = r.shape[:1] if per_example else ()
        result: ParamDict = {}
        if want_w:
            xhat_sq = self._normalized_flat(module, inputs).square()
            pattern = "n t f, n t f -> n f" if per_example else "n t f, n t f -> f"
            result["weight"] = einsum(r, xhat_sq, pattern).reshape(*lead, *module.weight.shape)
        if want_b:
            r_sum = r.sum(1) if per_example else r.sum((0, 1))
            result["bias"] = r_sum.reshape(*lead, *module.bias.shape)
        return result


class _TrailingNormRule(AffineNormRule):
    """Parameters over the trailing ``normalized_shape`` axes."""

    def positions_last(self, module: nn.Module, t: Tensor) -> Tensor:
        features = len(module.normalized_shape)
        return t.reshape(*t.shape[:2], -1, *t.shape[t.dim() - features :]).flatten(3)


@register_rule(nn.LayerNorm)
class LayerNormRule(_TrailingNormRule):
    """``nn.LayerNorm`` (with or without bias)."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """Layer-normalized ``x`` without affine transform."""
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)


@register_rule(nn.RMSNorm)
class RMSNormRule(_TrailingNormRule):
    """``nn.RMSNorm`` (weight only)."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """RMS-normalized ``x`` without weight."""
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class _ChannelNormRule(AffineNormRule):
    """Parameters over the channel axis (dim 1 of the input)."""

    def positions_last(self, module: nn.Module, t: Tensor) -> Tensor:
        return rearrange(t, "b n c ... -> b n (...) c")


@register_rule(nn.GroupNorm)
class GroupNormRule(_ChannelNormRule):
    """``nn.GroupNorm`` (statistics per example and group, so no mixing of examples)."""

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """Group-normalized ``x`` without affine transform."""
        return F.group_norm(x, module.num_groups, None, None, module.eps)


@register_rule(_BatchNorm)
class BatchNormEvalRule(_ChannelNormRule):
    """``nn.BatchNorm1d/2d/3d`` (and subclasses) in eval mode, normalizing with running statistics."""

    def check(self, module: nn.Module) -> None:
        """Raise unless the module normalizes with running statistics (eval mode, tracked stats)."""
        if module.training or module.running_mean is None or module.running_var is None:
            reason = "is in training mode" if module.training else "has track_running_stats=False"
            raise UnsupportedModuleError(
                f"{type(module).__name__} {reason}: it normalizes with batch statistics, which mix the "
                "examples, so per-example quantities are undefined. Use eval mode with running statistics "
                "(track_running_stats=True, model.eval()) or replace it with nn.GroupNorm."
            )

    def normalized(self, module: nn.Module, x: Tensor) -> Tensor:
        """``(x - running_mean) / sqrt(running_var + eps)`` per channel."""
        return F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
