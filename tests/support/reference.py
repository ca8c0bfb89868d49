"""Independent brute-force references (torch.func / autograd) used by the tests.

Every reference here differentiates the whole model and loss as ordinary functions;
none uses the engine or the rules.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, hessian, jacrev, vjp, vmap

LossFn = Callable[[Tensor, Tensor], Tensor]


def apply(model: nn.Module, params: dict[str, Tensor], x: object) -> Tensor:
    """``model(x)`` with ``params``: ``x`` a tensor, a tuple of positional arguments or a dict of keyword arguments."""
    if isinstance(x, dict):
        return functional_call(model, params, (), x)
    return functional_call(model, params, tuple(x) if isinstance(x, tuple) else (x,))


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def batch_loss(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> Callable[[dict[str, Tensor]], Tensor]:
    """``params -> L`` for the whole batch, as computed."""

    def f(params: dict[str, Tensor]) -> Tensor:
        return loss_fn(apply(model, params, x), y)

    return f


def per_example_grads(model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """``[N, *p]``: gradient of example n's term of L, by differentiating L with one example's
    contribution isolated (works for every reduction: the other examples are held fixed)."""
    params = trainable(model)
    n = _examples(x)

    def example_term(p: dict[str, Tensor], i: Tensor) -> Tensor:
        # L evaluated with the parameters of example i set to p and the others detached
        # is not expressible; instead use the identity grad_n = d/deps L(x) with example-wise
        # parameter copies: L(theta + eps_n for example n). We differentiate a batch forward
        # where only example i sees p.
        out_p = apply(model, p, x)
        out_0 = apply(model, params, x).detach()
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
    n = _examples(x)
    out_0 = apply(model, params, x).detach()
    result: dict[str, list[Tensor]] = {k: [] for k in params}
    for i in range(n):
        mask = (torch.arange(n) == i).reshape(n, *([1] * (out_0.dim() - 1)))

        def term(p: dict[str, Tensor], mask: Tensor = mask) -> Tensor:
            return loss_fn(torch.where(mask, apply(model, p, x), out_0), y)

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
    out = apply(model, params, x).detach()
    jac = jacrev(lambda p: apply(model, p, x))(params)  # [*out, *p]
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


def _examples(x: object) -> int:
    """Dim 0 of the first tensor among the model's arguments."""
    if isinstance(x, dict):
        x = next(v for v in x.values() if isinstance(v, Tensor))
    elif isinstance(x, tuple):
        x = x[0]
    return x.shape[0]


def ggn_diagonal_by_example(
    model: nn.Module, loss_fn: LossFn, x: object, y: Tensor, per_example: bool = False
) -> dict[str, Tensor]:
    """As :func:`ggn_diagonal`, with the Jacobian formed one example at a time (rows by ``vjp``).

    Needs memory for one example's ``K`` output rows of the Jacobian, not all ``N * K``:
    for real models with many parameters.
    """
    params = trainable(model)
    out, pullback = vjp(lambda p: apply(model, p, x), params)
    out = out.detach()
    n, k = out.shape[0], out[0].numel()
    h_out = hessian(lambda f: loss_fn(f, y))(out).reshape(n, k, n, k)
    off_diag = h_out.clone()
    off_diag[torch.arange(n), :, torch.arange(n), :] = 0
    assert off_diag.abs().max() == 0, "loss Hessian couples examples"
    rows: dict[str, list[Tensor]] = {name: [] for name in params}
    for i in range(n):
        one_hot = torch.zeros(k, n, k, dtype=out.dtype)
        one_hot[torch.arange(k), i, torch.arange(k)] = 1
        (jac,) = vmap(pullback)(one_hot.reshape(k, *out.shape))  # {name: [K, *p]}
        block = h_out[i, :, i, :]
        for name, v in params.items():
            j = jac[name].reshape(k, -1)
            rows[name].append(torch.einsum("kp,kl,lp->p", j, block, j).reshape(v.shape))
    return {name: torch.stack(r) if per_example else torch.stack(r).sum(0) for name, r in rows.items()}


def hessian_diagonal_by_columns(
    model: nn.Module, loss_fn: LossFn, x: object, y: Tensor, chunk: int = 32
) -> dict[str, Tensor]:
    """As :func:`hessian_diagonal`, by double backward of one-hot vectors in chunks (for real models).

    Only the parameters with ``requires_grad`` (freeze the others to keep it cheap).
    """
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out = model(**x) if isinstance(x, dict) else model(x)
    grads = torch.autograd.grad(loss_fn(out, y), list(params.values()), create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    size = flat.numel()
    diag = []
    for start in range(0, size, chunk):
        stop = min(size, start + chunk)
        eye = torch.zeros(stop - start, size, dtype=flat.dtype)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        rows = torch.autograd.grad(flat, list(params.values()), eye, retain_graph=True, is_grads_batched=True)
        rows = torch.cat([r.reshape(stop - start, -1) for r in rows], 1)
        diag.append(rows[torch.arange(stop - start), torch.arange(start, stop)])
    diag_flat = torch.cat(diag)
    pieces = diag_flat.split([p.numel() for p in params.values()])
    return {k: d.reshape(p.shape) for (k, p), d in zip(params.items(), pieces)}


def hessian_diagonals_reverse_mode(
    model: nn.Module, fn: LossFn, x: Tensor, y: Tensor
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Full and per-example Hessian diagonals by reverse over reverse mode.

    ``torch.func.hessian`` (forward over reverse) cannot differentiate ``_weight_norm``,
    which has no forward-mode derivative.
    """
    params = trainable(model)
    n = x.shape[0]
    out_0 = functional_call(model, params, (x,)).detach()

    def diagonal(f):
        h = jacrev(jacrev(f))(params)
        return {k: h[k][k].reshape(v.numel(), v.numel()).diagonal().reshape(v.shape) for k, v in params.items()}

    full = diagonal(lambda p: fn(functional_call(model, p, (x,)), y))
    rows = []
    for i in range(n):
        mask = (torch.arange(n) == i).reshape(n, *([1] * (out_0.dim() - 1)))
        rows.append(diagonal(lambda p, mask=mask: fn(torch.where(mask, functional_call(model, p, (x,)), out_0), y)))
    return full, {k: torch.stack([r[k] for r in rows]) for k in params}
