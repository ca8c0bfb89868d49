"""Vector-Jacobian products with a batch of vectors, vectorized by ``torch.func.vmap``.

``torch.autograd.grad(..., is_grads_batched=True)`` vectorizes with PyTorch's legacy
``vmap``, which runs backward kernels that lack a legacy batching rule
(``_log_softmax_backward_data``, ``tanh_backward``, ...) once per vector: on a small MLP
with cross-entropy that made a batch of Hessian-vector products slower than a Python
loop. :func:`batched_grad` maps ``torch.autograd.grad`` with :func:`torch.func.vmap`
instead, whose batching rules cover these kernels (25x faster there), and falls back to
``is_grads_batched`` only if ``torch.func`` refuses the graph.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from secorder_hooks._warnings import vmap_fallbacks_allowed

__all__ = ["batched_grad"]


def batched_grad(
    outputs: Sequence[Tensor | GradientEdge],
    inputs: Sequence[Tensor | GradientEdge],
    vectors: Sequence[Tensor],
    create_graph: bool = False,
) -> list[Tensor | None]:
    """``[B, *x.shape]`` vector-Jacobian products for every input (``None`` where unused).

    Args:
        outputs: Tensors (or gradient edges) to differentiate.
        inputs: Tensors to differentiate with respect to.
        vectors: One ``[B, *out.shape]`` batch of vectors per output.
        create_graph: Keep the results differentiable.

    The graph of ``outputs`` is retained.
    """
    outputs, inputs, vectors = list(outputs), list(inputs), list(vectors)
    unused: list[bool] = []

    def one(*vs: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(
            outputs, inputs, grad_outputs=list(vs), retain_graph=True, create_graph=create_graph, allow_unused=True
        )
        unused[:] = [g is None for g in grads]
        return tuple(vs[0].new_zeros(()) if g is None else g for g in grads)

    if vectors[0].shape[0] == 1:  # one vector: no vectorization needed
        grads = torch.autograd.grad(outputs, inputs, [v[0] for v in vectors], True, create_graph, allow_unused=True)
        return [None if g is None else g.unsqueeze(0) for g in grads]
    try:
        with vmap_fallbacks_allowed():
            result = torch.func.vmap(one)(*vectors)
    except RuntimeError:  # torch.func refuses the graph: the legacy vmap, else one vector at a time
        try:
            return list(
                torch.autograd.grad(
                    outputs, inputs, vectors, True, create_graph, allow_unused=True, is_grads_batched=True
                )
            )
        except RuntimeError:
            looped = [
                torch.autograd.grad(outputs, inputs, list(vs), True, create_graph, allow_unused=True)
                for vs in zip(*vectors)
            ]
            return [None if g[0] is None else torch.stack(g) for g in zip(*looped)]
    return [None if u else r for u, r in zip(unused, result)]
