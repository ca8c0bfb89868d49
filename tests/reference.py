"""Independent brute-force references (torch.func / autograd) used by the tests.

Every reference here differentiates the whole model and loss as ordinary functions;
none uses the engine or the rules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def batch_loss(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """``params -> L`` for the whole batch, as computed."""

    def f(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(functional_call(model, params, (x,)), y)

    return f


def per_example_grads(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``[N, *p]``: gradient of example n's term of L, by differentiating L with one example's
    contribution isolated (works for every reduction: the other examples are held fixed)."""
    params = trainable(model)
    n = x.shape[0]

    def example_term(p: dict[str, Tensor], i: Tensor) -> Tensor:
        # L evaluated with the parameters of example i set to p and the others detached
        # is not expressible; instead use the identity grad_n = d/deps L(x) with example-wise
        # parameter copies: L(theta + eps_n for example n). We differentiate a batch forward
        # where only example i sees p.
        out_p = functional_call(model, p, (x,))
        out_0 = functional_call(model, params, (x,)).detach()
        mask = (torch.arange(n) == i).reshape(n, *([1] * (out_p.dim() - 1)))
        return loss_fn(torch.where(mask, out_p, out_0), y)

    return vmap(grad(example_term), in_dims=(None, 0))(params, torch.arange(n))


def hessian_diagonal(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Diagonal of the Hessian of L with respect to each parameter tensor."""
    params = trainable(model)
    h = hessian(batch_loss(model, loss_fn, x, y))(params)
    return {k: h[k][k].reshape(v.numel(), v.numel()).diagonal().reshape(v.shape) for k, v in params.items()}


def per_example_hessian_diagonal(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``[N, *p]``: diagonal of the Hessian of example n's term of L."""
    params = trainable(model)
    n = x.shape[0]
    out_0 = functional_call(model, params, (x,)).detach()
    result: dict[str, list[Tensor]] = {k: [] for k in params}
    for i in range(n):
        mask = (torch.arange(n) == i).reshape(n, *([1] * (out_0.dim() - 1)))

        def term(p: dict[str, Tensor], mask: Tensor = mask) -> Tensor:
            return loss_fn(torch.where(mask, functional_call(model, p, (x,)), out_0), y)

        h = hessian(term)(params)
        for k, v in params.items():
            result[k].append(h[k][k].reshape(v.numel(), v.numel()).diagonal().reshape(v.shape))
    return {k: torch.stack(v) for k, v in result.items()}


def ggn_diagonal(
    model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, per_example: bool = False
) -> dict[str, Tensor]:
    """Diagonal of ``J^T (d^2 L / df^2) J`` from the full Jacobian of the model output.

    With ``per_example``, ``[N, *p]``: the terms of the GGN belonging to each example
    (the loss Hessian must be block diagonal over examples, which the references assert).
    """
    params = trainable(model)
    out = functional_call(model, params, (x,)).detach()
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)  # [*out, *p]
    h_out = hessian(lambda f: loss_fn(f, y))(out)  # [*out, *out]
    n, k = out.shape[0], out[0].numel()
    h_out = h_out.reshape(n, k, n, k)
    off_diag = h_out.clone()
    off_diag[torch.arange(n), :, torch.arange(n), :] = 0
    assert off_diag.abs().max() == 0, "loss Hessian couples examples"
    result = {}
    for name, v in params.items():
        j = jac[name].reshape(n, k, v.numel())  # [N, K, P]
        blocks = h_out[torch.arange(n), :, torch.arange(n), :]  # [N, K, K]
        diag = torch.einsum("nkp,nkl,nlp->np", j, blocks, j)
        result[name] = diag.reshape(n, *v.shape) if per_example else diag.sum(0).reshape(v.shape)
    return result


def ggn_blocks(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``[P, P]`` diagonal block of ``J^T (d^2 L / df^2) J`` of each parameter tensor (row-major ``p.flatten()``)."""
    params = trainable(model)
    out = functional_call(model, params, (x,)).detach()
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    h_out = hessian(lambda f: loss_fn(f, y))(out).reshape(out.numel(), out.numel())
    blocks = {}
    for name, v in params.items():
        j = jac[name].reshape(out.numel(), v.numel())
        blocks[name] = j.T @ h_out @ j
    return blocks


def joint_ggn_block(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, weight: str, bias: str) -> Tensor:
    """GGN block of the rows ``[W | b]`` of a layer, row-major over ``[O, I + 1]``."""
    params = trainable(model)
    out = functional_call(model, params, (x,)).detach()
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    h_out = hessian(lambda f: loss_fn(f, y))(out).reshape(out.numel(), out.numel())
    o = params[weight].shape[0]
    j = torch.cat([jac[weight].reshape(out.numel(), o, -1), jac[bias].reshape(out.numel(), o, 1)], dim=2)
    j = j.reshape(out.numel(), -1)
    return j.T @ h_out @ j


def empirical_blocks(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``sum_n g_n g_n^T`` per parameter tensor, ``g_n`` example n's gradient term of L (``grad_batch``)."""
    grads = per_example_grads(model, loss_fn, x, y)
    return {k: g.flatten(1).T @ g.flatten(1) for k, g in grads.items()}
