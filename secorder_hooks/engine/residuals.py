r"""Finding the curved operations whose second-order term the exact Hessian needs.

For :math:`L = \ell(f(\theta))` the diagonal of the Hessian is the GGN diagonal plus, for
every curved operation between a parameter and :math:`f`,

* elementwise :math:`h = \phi(a)`: :math:`\sum_e \phi''(a_e)\, r_e\,
  (\partial a_e / \partial\theta)^2` with :math:`r = \partial L / \partial h`;
* elementwise product :math:`h = u \odot v` with both factors depending on
  :math:`\theta`: :math:`\sum_e 2 r_e\, (\partial u_e/\partial\theta)
  (\partial v_e/\partial\theta)`;
* row-wise :math:`h_\rho = \phi(a_\rho)` (softmax, layer norm, ...): the blocks of
  :mod:`secorder_hooks.engine.rowwise`.

:func:`find_sites` walks the autograd graph below :math:`f` once, before the backward
pass, and returns these *sites*; :math:`r` is captured at each site's node during the
ordinary backward pass. Operations whose second-order term is unknown raise
:class:`~secorder_hooks.errors.UnsupportedOperationError` when a parameter lies below
them, so that no Hessian is silently reported as the GGN.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterable
from dataclasses import dataclass

from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from secorder_hooks.autodiff.graph import children, iter_nodes, leaf_variable, only_input
from secorder_hooks.engine.curved_ops import (
    AFFINE,
    ELEMENTWISE,
    ELEMENTWISE_PRODUCT,
    LINEAR_IN_FIRST,
    MULTILINEAR,
    node_name,
)
from secorder_hooks.engine.mixing import BATCH_NORMS
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.engine.rowwise import ROWWISE, instance_rows
from secorder_hooks.errors import UnsupportedOperationError

__all__ = ["SiteKind", "CurvedSite", "WeightUse", "find_sites", "internal_nodes", "params_below", "records_below"]


class SiteKind(enum.Enum):
    """The two kinds of second-order terms the engine computes."""

    ELEMENTWISE = "elementwise"
    PRODUCT = "product"
    ROWWISE = "rowwise"
    REUSED_WEIGHT = "reused_weight"


@dataclass(frozen=True)
class WeightUse:
    r"""A weight entering a matrix product :math:`h = \alpha\, a\, B` directly, ``B = W^T`` or ``W``.

    Attributes:
        param: Id of the parameter ``W``.
        transposed: ``B = W^T`` (``F.linear``), else ``B = W``.
        alpha: The product's scale (``addmm``'s ``alpha``).
    """

    param: int
    transposed: bool
    alpha: float = 1.0


_MATRIX_PRODUCTS = {"AddmmBackward0": (1, 2), "MmBackward0": (0, 1)}
"""Matrix products whose cross term between a reused weight and its activation is computed: (a, B) positions."""


def _weight_use(node: Node, edges: list[GradientEdge]) -> WeightUse | None:
    """How a parameter enters the second factor of a 2-D matrix product directly, if it does."""
    positions = _MATRIX_PRODUCTS.get(node_name(node))
    if positions is None:
        return None
    first, second = positions
    a = node._saved_mat1 if node_name(node) == "AddmmBackward0" else node._saved_self
    if a is None or a.dim() != 2 or edges[first].node is None or edges[second].node is None:
        return None
    factor = edges[second].node
    transposed = node_name(factor) == "TBackward0"
    if transposed:
        inner = only_input(factor)
        factor = factor.next_functions[inner][0] if inner is not None else None
    var = leaf_variable(factor) if factor is not None else None
    if var is None or leaf_variable(edges[first].node) is not None:
        return None
    return WeightUse(id(var), transposed, float(getattr(node, "_saved_alpha", 1.0)))


@dataclass(eq=False)
class CurvedSite:
    r"""One curved operation between parameters and the loss.

    Attributes:
        node: The operation's autograd node.
        kind: Elementwise function or elementwise product.
        sources: Gradient edges of its input ``a`` (elementwise) or factors ``u, v``.
        grad: :math:`\partial L / \partial h` at its output, captured in the backward pass.
        examples: For an instance normalization (batch norm over ``[1, N * C, ...]``), the
            ``N`` its rows belong to; checked against the batch size.
        weight: For a matrix product of an activation and a weight the activation depends
            on too (a module called twice in a chain, tied weights): how the weight enters.
    """

    node: Node
    kind: SiteKind
    sources: tuple[GradientEdge, ...]
    grad: Tensor | None = None
    examples: int | None = None
    weight: WeightUse | None = None

    def capture(self, grad_outputs: tuple[Tensor | None, ...]) -> None:
        """Node pre-hook storing the gradient at the operation's output."""
        self.grad = grad_outputs[0]


def params_below(root: Node, param_ids: set[int]) -> dict[Node, frozenset[int]]:
    """For every node reachable from ``root``: the ids of the parameters below it."""
    below: dict[Node, frozenset[int]] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if node in below:
            continue
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in children(node) if child not in below)
            continue
        found: set[int] = set()
        var = leaf_variable(node)
        if var is not None and id(var) in param_ids:
            found.add(id(var))
        for child in children(node):
            found |= below[child]
        below[node] = frozenset(found)
    return below


def internal_nodes(rec: CallRecord) -> set[Node]:
    """Nodes created inside one module call: between its outputs and its inputs."""
    stop = {t.grad_fn for t in rec.inputs if isinstance(t, Tensor) and t.grad_fn is not None}
    inside: set[Node] = set()
    for edge in rec.output_edges:
        inside.update(node for node in iter_nodes(edge.node, stop) if node not in stop)
    return inside


def find_sites(
    root: Node,
    param_ids: set[int],
    self_curved: Iterable[tuple[CallRecord, frozenset[int]]],
    describe: dict[int, str],
) -> list[CurvedSite]:
    """The curved operations below ``root`` whose second-order terms reach parameters.

    Args:
        root: The node producing the tensor the loss term differentiates.
        param_ids: Ids of the trainable parameters.
        self_curved: Calls of modules whose rule gives the second-order term of their
            own parameters (``own_hessian_term``), with the ids of those parameters;
            operations inside these calls are skipped for those parameters.
        describe: Parameter id -> qualified name, for error messages.

    Raises:
        UnsupportedOperationError: An operation with a parameter below it has a
            second-order term the engine does not compute.
    """
    below = params_below(root, param_ids)
    covered: dict[Node, frozenset[int]] = {}
    for rec, own in self_curved:
        for node in internal_nodes(rec):
            covered[node] = covered.get(node, frozenset()) | own
    sites = []
    for node in below:
        name = node_name(node)
        if name in AFFINE:
            continue
        skip = covered.get(node, frozenset())
        inputs = [(edge, below[edge[0]] - skip if edge[0] is not None else frozenset()) for edge in node.next_functions]
        if not any(params for _, params in inputs):
            continue
        edges = [GradientEdge(e[0], e[1]) for e, _ in inputs]
        batch_stats = name in BATCH_NORMS and bool(getattr(node, "_saved_training", False))
        if name in ELEMENTWISE or (name in ROWWISE and (name not in BATCH_NORMS or batch_stats)):
            kind = SiteKind.ELEMENTWISE if name in ELEMENTWISE else SiteKind.ROWWISE
            examples = None
            if batch_stats:
                examples = instance_rows(node)
                if examples is None and inputs[0][1]:
                    raise _unsupported(name, _first(inputs[0][1], describe), _BATCH_STATISTICS)
            if kind is SiteKind.ROWWISE:
                shared = inputs[0][1] & frozenset().union(*(p for _, p in inputs[1:]))
                if shared:
                    raise _unsupported(name, _first(shared, describe), "its input and its weight depend on it")
            if inputs[0][1]:
                sites.append(CurvedSite(node, kind, (edges[0],), examples=examples))
        elif name in LINEAR_IN_FIRST and not any(params for _, params in inputs[1:]):
            continue  # a / c with c free of parameters: linear in a
        elif name in MULTILINEAR:
            for i, j in itertools.combinations(MULTILINEAR[name], 2):
                shared = inputs[i][1] & inputs[j][1]
                use = _weight_use(node, edges) if shared else None
                if shared and name == ELEMENTWISE_PRODUCT:
                    sites.append(CurvedSite(node, SiteKind.PRODUCT, (edges[i], edges[j])))
                elif use is not None and shared == {use.param}:
                    sites.append(CurvedSite(node, SiteKind.REUSED_WEIGHT, (edges[i],), weight=use))
                elif shared:
                    raise _unsupported(
                        name,
                        _first(shared, describe),
                        "two factors of this product depend on it (the cross term between two uses of a weight is "
                        "computed only for 2-D inputs of F.linear / mm with the weight itself as second factor)",
                    )
        else:
            params = next(p for _, p in inputs if p)
            raise _unsupported(name, _first(params, describe), "its second derivative is not known to the engine")
    return sites


_BATCH_STATISTICS = (
    "it normalizes with statistics over several examples of the batch (batch statistics), which are not per-example"
)


def _first(params: frozenset[int], describe: dict[int, str]) -> str:
    """The alphabetically first name among ``params`` (deterministic messages)."""
    return min(describe[key] for key in params)


def _unsupported(name: str, param: str, why: str) -> UnsupportedOperationError:
    if name.startswith("ScaledDotProduct"):
        return UnsupportedOperationError(
            f"the exact Hessian needs the second-order term of the fused attention kernel {name} (from "
            f"F.scaled_dot_product_attention) between parameter '{param}' and the loss; fused kernels have no "
            "second derivative. The engine's DiagHessian does not cover attention in any implementation (both "
            "factors of q k^T depend on the same parameters), but DiagGGNExact, DiagGGNMC and the first-order "
            "quantities do. For the exact Hessian diagonal use secorder_hooks.model_hessian_diagonal (it falls "
            "back to the exact generic path and runs attention in its math kernel), or, with your own closure and "
            'secorder_hooks.hessian_diagonal, the math implementation of attention: attn_implementation="eager" '
            'for Hugging Face models (from_pretrained(..., attn_implementation="eager")), or the forward inside '
            "torch.nn.attention.sdpa_kernel(SDPBackend.MATH)."
        )
    return UnsupportedOperationError(
        f"the exact Hessian needs the second-order term of the operation {name} between parameter '{param}' and "
        f"the loss, and {why}. DiagGGNExact and the first-order quantities support this model; for DiagHessian, "
        "replace the operation by a supported one (elementwise activations, products of activations) or use "
        "secorder_hooks.hessian_diagonal (generic, slower)."
    )


def records_below(sources: Iterable[GradientEdge], records: Iterable[CallRecord]) -> list[CallRecord]:
    """The records with an output reachable from (or at) any of ``sources``."""
    reachable: set[Node] = set()
    for edge in sources:
        reachable.update(iter_nodes(edge.node))
    return [rec for rec in records if any(e.node in reachable for e in rec.output_edges)]
