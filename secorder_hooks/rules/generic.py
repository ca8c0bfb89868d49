"""Generic fallback rule: per-example gradients of any module by ``torch.func``.

Placeholder implementation; see the generic-rule issue work.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten

from secorder_hooks.rules.base import LayerRule, ParamDict, trainable_parameters

__all__ = ["GenericRule", "GENERIC_RULE"]


class GenericRule(LayerRule):
    """Per-example gradients of a module's own parameters, the module treated as a leaf."""

    def per_example_grads(self, module: nn.Module, inputs: Sequence, grad_output) -> ParamDict:
        params = {k: p.detach() for k, p in trainable_parameters(module).items()}
        grads = grad_output if isinstance(grad_output, tuple) else (grad_output,)
        kwargs = getattr(inputs, "kwargs", {})
        indices = getattr(inputs, "differentiable_outputs", (0,))
        n = grads[0].shape[1]
        in_dims = tuple(0 if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else None for a in inputs)

        def example(args, cotangents):
            def f(p):
                batched = [a.unsqueeze(0) if d == 0 else a for a, d in zip(args, in_dims)]
                flat = tree_flatten(functional_call(module, p, tuple(batched), kwargs))[0]
                return tuple(flat[i].squeeze(0) for i in indices)

            _, fn = vjp(f, params)
            return vmap(fn)(cotangents)[0]

        out = vmap(example, in_dims=(in_dims, 1))(tuple(inputs), grads)
        return {k: v.transpose(0, 1) for k, v in out.items()}


GENERIC_RULE = GenericRule()
