r"""Any scalar loss, its per-example Hessian blocks obtained by double backward.

For a loss :math:`L(f)` that is a sum over examples (no term couples :math:`f_n` and
:math:`f_m`, :math:`n \ne m`), the Hessian is block diagonal, and one Hessian-vector product
with the vector that is :math:`e_k` in every example gives column :math:`k` of every block at
once: ``prod(f)`` products in all, batched with :func:`~secorder_hooks.autodiff.vjp.batched_grad`.
One more product with a Gaussian probe checks block diagonality. Each block :math:`B_n = U \Lambda U^\top` then gives
columns :math:`\sqrt{|\lambda_k|}\, u_k` with weights :math:`\operatorname{sign}(\lambda_k)`, so
indefinite Hessians are represented exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge

from secorder_hooks.autodiff.vjp import batched_grad
from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses.base import LossTerm, SqrtColumns

__all__ = ["AutogradLossTerm"]


class AutogradLossTerm(LossTerm):
    """A scalar loss differentiated twice by autograd with respect to the tensor at an edge.

    Args:
        loss: Scalar loss tensor whose graph reaches ``f``.
        f: Gradient edge of the tensor :math:`f` (e.g. ``get_gradient_edge(output)``).
        shape: Shape ``[N, *f]`` of that tensor.
        chunk_size: Hessian-vector products per batched backward (``None``: all at once).
        name: Name used in messages.

    The loss graph is kept (``create_graph``), so the model graph stays usable afterwards.
    Monte-Carlo sampling is unsupported (no likelihood is known).
    """

    def __init__(
        self,
        loss: Tensor,
        f: GradientEdge,
        shape: torch.Size | tuple[int, ...],
        *,
        chunk_size: int | None = None,
        name: str = "loss",
    ) -> None:
        if loss.dim() != 0:
            raise UnsupportedLossError(f"{name}: expected a scalar loss, got shape {tuple(loss.shape)}.")
        self.loss, self.edge, self.shape, self.name = loss, f, torch.Size(shape), name
        self.chunk_size = chunk_size

    def hessian_blocks(self) -> Tensor:
        r"""``[N, K, K]`` blocks :math:`\partial^2 L / \partial f_n^2` (``K = prod(f)``), symmetrized.

        Raises:
            UnsupportedLossError: ``L`` does not reach ``f``, or its Hessian couples examples.
        """
        (grad,) = torch.autograd.grad(self.loss, [self.edge], create_graph=True, allow_unused=True)
        if grad is None:
            raise UnsupportedLossError(f"{self.name}: the loss does not depend on the tensor at the given edge.")
        n, k = self.shape[0], math.prod(self.shape[1:])
        if grad.shape != self.shape:
            raise UnsupportedLossError(
                f"{self.name}: edge tensor has shape {tuple(grad.shape)}, not {tuple(self.shape)}."
            )
        if not grad.requires_grad:  # loss linear in f
            return grad.new_zeros(n, k, k)
        eye = torch.eye(k, dtype=grad.dtype, device=grad.device)
        probe_gen = torch.Generator(device=grad.device).manual_seed(0)
        probe = torch.randn((n, k), dtype=grad.dtype, device=grad.device, generator=probe_gen)
        vectors = torch.cat([eye[:, None, :].expand(k, n, k), probe[None]]).reshape(k + 1, *self.shape)
        products = self._hvps(grad, vectors).reshape(k + 1, n, k)
        blocks = products[:k].permute(1, 2, 0)  # [N, row, column]
        predicted = torch.einsum("nij,nj->ni", blocks, probe)
        error = (products[k] - predicted).norm()
        scale = products[k].norm() + predicted.norm() + torch.finfo(grad.dtype).tiny
        if error > 1e3 * torch.finfo(grad.dtype).eps * math.sqrt(k) * scale:
            raise UnsupportedLossError(
                f"{self.name}: the loss Hessian couples examples (relative off-block part {float(error / scale):.2e}); "
                f"per-example curvature needs a loss that is a sum of per-example terms (no batch statistics)."
            )
        return 0.5 * (blocks + blocks.transpose(1, 2))

    def _hvps(self, grad: Tensor, vectors: Tensor) -> Tensor:
        """``[B, *f]`` Hessian-vector products for ``vectors`` ``[B, *f]``, in chunks."""
        size = self.chunk_size or vectors.shape[0]
        out = []
        for chunk in vectors.split(size):
            (hv,) = batched_grad([grad], [self.edge], [chunk])
            out.append(torch.zeros_like(chunk) if hv is None else hv)
        return torch.cat(out)

    def sqrt_hessian(self) -> SqrtColumns:
        r"""``K = prod(f)`` columns :math:`\sqrt{|\lambda_k|} u_k` per example, weights :math:`\pm 1`.

        Returns:
            Columns ``[K, N, *f]`` and weights ``[K, N]``.
        """
        blocks = self.hessian_blocks()
        evals, evecs = torch.linalg.eigh(blocks)  # [N, K], [N, K(elem), K(col)]
        columns = (evecs * evals.abs().sqrt()[:, None, :]).permute(2, 0, 1)
        return SqrtColumns(columns.reshape(-1, *self.shape), evals.sign().T)
