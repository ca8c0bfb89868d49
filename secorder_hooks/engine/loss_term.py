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

Which examples the rows of :math:`f` belong to is :mod:`secorder_hooks.engine.rows`' job.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge

from secorder_hooks.autodiff.graph import iter_nodes, leaf_variable
from secorder_hooks.errors import UnsupportedLossError
from secorder_hooks.losses.autograd import AutogradLossTerm
from secorder_hooks.losses.base import LossTerm
from secorder_hooks.losses.factory import loss_term_from_call

if TYPE_CHECKING:
    from secorder_hooks.engine.session import Session

__all__ = ["select_loss_term"]


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
    candidates = _distinct(
        [(get_gradient_edge(c.input), c.input.shape) for c in calls if c.result.grad_fn in reachable]
    )
    if len(candidates) != 1:  # none, or several loss calls (a sum of losses) on different functions of one output
        candidates = _distinct(
            [
                (forward.output_edge, forward.output_shape)
                for forward in session.records.passes
                if forward.output_edge.node in reachable
            ]
        )
    if len(candidates) != 1:
        found = "no" if not candidates else f"{len(candidates)}"
        raise UnsupportedLossError(
            f"curvature quantities need the loss as a function of one model output, but {found} candidate "
            "outputs (recognized loss calls or model outputs) feed this loss. Compute the loss from a single "
            "forward pass with one standard loss function, or return a single tensor from the model; for several "
            "forward calls, take one loss of their concatenation (torch.cat of the outputs and of the targets)."
        )
    edge, shape = candidates[0]
    term = AutogradLossTerm(loss, edge, shape)
    _check_only_through(session, loss, term)
    return term


def _distinct(candidates: list[tuple[GradientEdge, torch.Size]]) -> list[tuple[GradientEdge, torch.Size]]:
    """``candidates`` without repeats of one graph value (the same gradient edge), in order."""
    seen: dict[tuple[object, int], tuple[GradientEdge, torch.Size]] = {}
    for edge, shape in candidates:
        seen.setdefault((edge.node, edge.output_nr), (edge, shape))
    return list(seen.values())


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
