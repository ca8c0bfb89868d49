r"""Which loss term a backward pass differentiates, and its columns per example.

The curvature quantities need the Hessian of the loss :math:`L` with respect to a tensor
:math:`f` of the model graph, as columns :math:`s_k` with
:math:`\sum_k w_{kn} s_{kn} s_{kn}^\top = \partial^2 L / \partial f_n^2` for every example
:math:`n`. :func:`select_loss_term` finds :math:`f` and the term:

* ``loss`` is the result of a recognized loss function (``F.cross_entropy``,
  ``nn.MSELoss``, ...): closed form, with sampling for the Monte-Carlo Fisher;
* otherwise (``2 * loss``, a custom per-example loss) :math:`f` is the input of the one
  recognized loss call the loss depends on, or the model output, and the Hessian blocks
  come from autograd.

:func:`example_columns` makes the columns per-example exact when :math:`f` is a
flattened view of ``[N, T, ...]`` (e.g. ``logits.reshape(-1, C)`` for a sequence model):
rows of one example then must not share a column.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from einops import rearrange
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from secorder_hooks.engine.graph import iter_nodes, leaf_variable
from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses.autograd import AutogradLossTerm
from secorder_hooks.losses.base import LossTerm, SqrtColumns
from secorder_hooks.losses.factory import loss_term_from_call

if TYPE_CHECKING:
    from secorder_hooks.engine.session import Session

__all__ = ["select_loss_term", "example_columns", "rows_per_example"]

_FLATTENING_VIEWS = frozenset({"ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0"})


def select_loss_term(session: Session, loss: Tensor) -> LossTerm:
    """The loss term of ``loss``, built from what the session recorded in the forward pass.

    Raises:
        UnsupportedLossError: ``loss`` is not a scalar, the model output cannot be told,
            or parameters reach the loss other than through it.
    """
    if loss.numel() != 1:
        raise UnsupportedLossError(
            f"curvature quantities need a scalar loss; loss.backward() was called on a tensor of shape "
            f"{tuple(loss.shape)}. Reduce it with .sum() or .mean() first."
        )
    calls = session.loss_calls
    for call in calls:
        if call.result is loss:
            term = loss_term_from_call(call)
            _check_only_through(session, loss, term)
            return term
    reachable = set(iter_nodes(loss.grad_fn))
    candidates = [(get_gradient_edge(c.input), c.input.shape) for c in calls if c.result.grad_fn in reachable]
    if not candidates:
        candidates = [
            (forward.output_edge, forward.output_shape)
            for forward in session.records.passes
            if forward.output_edge.node in reachable
        ]
    if len(candidates) != 1:
        found = "no" if not candidates else f"{len(candidates)}"
        raise UnsupportedLossError(
            f"curvature quantities need the loss as a function of one model output, but {found} candidate "
            "outputs (recognized loss calls or model outputs) feed this loss. Compute the loss from a single "
            "forward pass with one standard loss function, or return a single tensor from the model."
        )
    edge, shape = candidates[0]
    term = AutogradLossTerm(loss, edge, shape)
    _check_only_through(session, loss, term)
    return term


def _check_only_through(session: Session, loss: Tensor, term: LossTerm) -> None:
    """Raise if a trainable parameter reaches ``loss`` other than through ``term.edge``."""
    for node in iter_nodes(loss.grad_fn, stop={term.edge.node}):
        if node is term.edge.node:
            continue
        var = leaf_variable(node)
        if var is not None and id(var) in session.params:
            raise UnsupportedLossError(
                f"parameter '{session.param_names[id(var)]}' enters the loss other than through the model output "
                f"({term.name}), e.g. through a penalty term. Curvature of such a loss is not block diagonal over "
                "examples; add the penalty's curvature yourself after leaving extend()."
            )


def rows_per_example(edge: GradientEdge, shape: torch.Size) -> int:
    """How many rows along dim 0 of the tensor at ``edge`` belong to one example.

    1, unless the tensor is a row-major flattening view of ``[N, T1, ..., *rest]`` to
    ``[N * T1 * ..., *rest]``, as ``logits.reshape(-1, C)`` of a sequence model is.
    """
    node = edge.node
    if type(node).__name__ not in _FLATTENING_VIEWS:
        return 1
    sizes = tuple(getattr(node, "_saved_self_sym_sizes", ()) or getattr(node, "_saved_self_sizes", ()))
    rest = tuple(shape[1:])
    for split in range(2, len(sizes)):
        if sizes[split:] == rest and int(torch.Size(sizes[:split]).numel()) == shape[0]:
            return shape[0] // sizes[0]
    return 1


def example_columns(term: LossTerm, sqrt: SqrtColumns) -> SqrtColumns:
    r"""Columns whose per-example restrictions factor each example's Hessian block.

    Columns of a loss term factor the Hessian block of every *row* of :math:`f`. When
    ``T > 1`` rows belong to one example, column :math:`k` is split into ``T`` columns,
    the ``t``-th keeping only row ``t`` of each example, so that the block of an example
    (block diagonal over its rows) is factored without cross-row terms.

    Args:
        term: The loss term (its edge and shape locate the rows).
        sqrt: ``[K, R, *rest]`` columns and ``[K, R]`` weights, ``R = N * T``.

    Returns:
        ``[K * T, R, *rest]`` columns and ``[K * T, N]`` weights (``None`` if none given).
    """
    t = rows_per_example(term.edge, term.shape)
    if t == 1:
        return sqrt
    cols = rearrange(sqrt.columns, "k (n t) ... -> k n t ...", t=t)
    eye = torch.eye(t, dtype=cols.dtype, device=cols.device).reshape(1, t, 1, t, *([1] * (cols.dim() - 3)))
    split = rearrange(cols.unsqueeze(1) * eye, "k s n t ... -> (k s) (n t) ...")
    weights = None
    if sqrt.weights is not None:
        weights = rearrange(sqrt.weights, "k (n t) -> (k t) n", t=t)
    return SqrtColumns(split, weights)
