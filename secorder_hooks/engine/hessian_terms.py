r"""The second-order terms of the exact Hessian diagonal (:attr:`~secorder_hooks.quantities.Columns.HESSIAN`).

The Hessian diagonal is the GGN part (the exact columns, :mod:`secorder_hooks.engine.curvature`)
plus, for every curved operation between a parameter and the loss
(:mod:`secorder_hooks.engine.residuals`), its second-order term: one-hot columns from the
operation's input weighted by :math:`\phi''(a) \odot \partial L/\partial h` (a closed form
when the operation directly follows a layer), eigen-factored blocks of row-wise operations,
polarized columns of products of two activations, the cross term of a weight reused in its
own activation; plus the own-parameter terms of modules whose output is not affine in their
parameters (the generic rule). :class:`HessianTerms` computes them once per backward pass
as diagonals, which every Hessian quantity's sink receives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils.hooks import RemovableHandle

from secorder_hooks.autodiff.graph import only_input
from secorder_hooks.engine.assemble import ColumnResults, Contributions
from secorder_hooks.engine.broadcast import replica_own_term
from secorder_hooks.engine.columns import backprop_columns, column_pass
from secorder_hooks.engine.curved_ops import DIAGONAL, node_name, second_derivative
from secorder_hooks.engine.mixing import mixes_examples
from secorder_hooks.engine.records import CallRecord
from secorder_hooks.engine.residuals import CurvedSite, SiteKind, find_sites, records_below
from secorder_hooks.engine.rows import RowMap
from secorder_hooks.engine.rowwise import block_columns, row_blocks
from secorder_hooks.engine.session import Session
from secorder_hooks.errors import UnsupportedOperationError
from secorder_hooks.quantities.diagonals import Diagonals
from secorder_hooks.rules.base import LayerRule, rule_parameters
from secorder_hooks.rules.lookup import rule_for

__all__ = ["HessianTerms"]


class HessianTerms:
    """The curved operations of one backward pass and their second-order terms.

    Args:
        sites: The curved operations between the parameters and the loss input.
        batch_size: Number of examples ``N``.
    """

    def __init__(self, sites: list[CurvedSite], batch_size: int) -> None:
        self.sites = sites
        self.batch_size = batch_size

    @classmethod
    def find(cls, session: Session, root: object, rows: RowMap) -> HessianTerms:
        """Find the curved operations below ``root`` (the loss input's node), raising before any work.

        Raises:
            UnsupportedOperationError: An operation whose second-order term is unknown, or
                one acting on rows that are not the examples.
        """
        self_curved = [
            (rec, frozenset(id(p) for p in rule_parameters(rule, rec.module).values()))
            for rec in session.records
            if _has_own_term(rule := rule_for(rec.module))
        ]
        sites = find_sites(root, set(session.params), self_curved, session.param_names)
        for site in sites:
            _check_site_rows(site, rows)
        return cls(sites, rows.batch_size)

    def capture(self) -> list[RemovableHandle]:
        r"""Hooks capturing :math:`\partial L / \partial h` at every curved operation (before the backward)."""
        return [site.node.register_prehook(site.capture) for site in self.sites]

    def compute(self, contributions: Contributions, into: Diagonals, chunk: int | None) -> None:
        """Add the term of every curved operation, and the own-parameter terms, ``into`` the diagonals.

        Args:
            contributions: The contributing calls, with gradients captured in the backward pass.
            into: Diagonal sums per parameter (per example if ``into.per_example``).
            chunk: Most one-hot columns per backward (``None``: all at once).
        """
        records = contributions.records()
        self._sites(contributions, records, into, chunk)
        self._own_terms(contributions, records, into)

    def _sites(self, contributions: Contributions, records: list[CallRecord], into: Diagonals, chunk: int | None):
        for site in self.sites:
            if site.grad is None:
                continue
            if site.kind is SiteKind.ELEMENTWISE:
                weights = second_derivative(site.node) * site.grad
                self._check_examples(site, weights)
                done = self._closed_forms(site, weights, contributions, into)
                targets = [rec for rec in records_below(site.sources, records) if rec not in done]
                columns = _one_hot(weights, _residual_chunk(weights, targets, chunk), product=False)
            elif site.kind is SiteKind.ROWWISE:
                if site.examples is not None and site.examples != self.batch_size:
                    raise UnsupportedOperationError(
                        f"the exact Hessian needs the second-order term of {type(site.node).__name__}, an instance "
                        f"normalization over {site.examples} examples, but the batch has {self.batch_size}. Keep "
                        "examples on dim 0, or use DiagGGNExact."
                    )
                blocks, to_input = row_blocks(site.node, site.grad)
                self._check_rows(site, blocks)
                targets = records_below(site.sources, records)
                if site.examples is not None:
                    self._check_instance_rows(site, targets)
                columns = (((to_input(cols),), w) for cols, w in block_columns(blocks, self.batch_size, chunk))
            elif site.kind is SiteKind.REUSED_WEIGHT:
                self._reused_weight(site, contributions, records, into)
                continue
            else:
                self._check_products(site)
                self._check_examples(site, site.grad)
                targets = records_below(site.sources, records)
                factors = (site.node._saved_self.shape, site.node._saved_other.shape)
                size = _residual_chunk(site.grad, targets, chunk, sources=2)
                columns = _to_factors(_one_hot(site.grad, size, product=True), factors)
            if targets:
                column_pass(contributions, site.sources, columns, targets, into)

    def _reused_weight(
        self, site: CurvedSite, contributions: Contributions, records: list[CallRecord], into: Diagonals
    ) -> None:
        r"""Cross term of :math:`h = \alpha\, a W^\top` whose activation ``a`` ``[N, I]`` depends on ``W`` too.

        :math:`\partial^2 (r^\top h) / \partial W_{pq}^2` has the cross term
        :math:`2 \alpha \sum_n r_{np}\, \partial a_{nq} / \partial W_{pq}` (for ``h = a W``,
        :math:`2 \alpha \sum_n r_{nq}\, \partial a_{np} / \partial W_{pq}`); the other terms are
        the sites below ``a``. One one-hot column per input coordinate ``q`` is
        backpropagated from ``a``; the per-example gradient of ``W`` of column ``q``, summed
        over all uses of ``W``, gives :math:`\partial a_{nq} / \partial W` (exact through any graph).
        """
        use = site.weight
        assert use is not None
        parts = contributions.by_param.get(use.param)
        targets = [rec for rec in records_below(site.sources, records) if any(rec is r for r, _ in parts or ())]
        if not parts or not targets:
            return
        r = site.grad  # [N, O]
        self._check_examples(site, r)
        n, k = r.shape[0], _factor(site.node).shape[1]
        eye = torch.eye(k, dtype=r.dtype, device=r.device)
        columns = eye[:, None, :].expand(k, n, k)  # [K(q), N, K]
        block = backprop_columns(site.sources, [columns], targets)

        def grad_outputs(rec: CallRecord) -> Tensor | tuple[Tensor, ...]:
            outs = block.get(id(rec)) or tuple(rec.zeros_like_output(i, (k,)) for i in range(len(rec.output_edges)))
            return outs[0] if len(outs) == 1 else outs

        g = ColumnResults(contributions, grad_outputs).per_example_grads(parts)  # [K(q), N, *W]
        # W [O, K]: d a_nq / d W_pq weighted by r_np; W [K, O]: d a_np / d W_pq weighted by r_nq
        pattern = "qnpq,np->npq" if use.transposed else "pnpq,nq->npq"
        term = 2 * use.alpha * torch.einsum(pattern, g, r)
        into.add(use.param, term if into.per_example else term.sum(0))

    def _closed_forms(
        self, site: CurvedSite, weights: Tensor, contributions: Contributions, into: Diagonals
    ) -> list[CallRecord]:
        r"""Closed forms of an elementwise site's term for the layers right below it.

        When the site's input :math:`a` is the output of a layer, its parameters get
        ``output_curvature(r)``. When that layer also has ``input_curvature`` and its input
        comes from the output :math:`z` of another layer through unary elementwise
        operations only (Jacobian :math:`\operatorname{diag}(d)`), the diagonal of the
        propagated matrix at :math:`z` is :math:`d^2 \odot` ``input_curvature(r)``, which is
        exact for that layer's parameters if each touches one output element.

        Returns:
            The records handled here (the column pass skips them).
        """
        done: list[CallRecord] = []
        weights_at, source = weights, site.sources[0]
        for depth in range(2):  # deeper layers see sums over paths: the columns are exact there
            record = _closed_form_record(source, contributions)
            if record is None:
                break
            rule = contributions.rules[record.module]
            if depth == 1 and not rule.touches_one_output(record.module, record.inputs):
                break
            terms = rule.output_curvature(record.module, record.inputs, weights_at, into.per_example)
            for name, value in terms.items():
                into.add(id(record.module.get_parameter(name)), value)
            done.append(record)
            below = rule.input_curvature(record.module, record.inputs, weights_at) if depth == 0 else None
            x = record.inputs[0] if record.inputs else None
            source = _diagonal_chain_end(x) if below is not None else None
            if source is None:
                break
            (d,) = torch.autograd.grad([x], [source], [torch.ones_like(x)], retain_graph=True)
            weights_at = d.square() * below
        return done

    def _own_terms(self, contributions: Contributions, records: list[CallRecord], into: Diagonals) -> None:
        for rec in records:
            rule = contributions.rules[rec.module]
            if not _has_own_term(rule):
                continue
            grads = rec.grad_output()
            grads = tuple(g[0] for g in grads) if isinstance(grads, tuple) else grads[0]
            if rec.replica is not None:
                terms = replica_own_term(rule, rec, grads, into.per_example)
            else:
                terms = rule.own_hessian_term(rec.module, rec.inputs, grads, into.per_example)
            for name, value in terms.items():
                into.add(id(rec.module.get_parameter(name)), value)

    def _check_examples(self, site: CurvedSite, values: Tensor) -> None:
        if values.dim() == 0 or values.shape[0] != self.batch_size:
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second-order term of {type(site.node).__name__} on a tensor of shape "
                f"{tuple(values.shape)}, whose dim 0 is not the {self.batch_size} examples of the batch. Keep "
                "examples on dim 0 of activations, or use DiagGGNExact."
            )

    def _check_rows(self, site: CurvedSite, blocks: Tensor) -> None:
        if blocks.shape[0] % self.batch_size:
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second-order term of {type(site.node).__name__} over "
                f"{blocks.shape[0]} rows, which cannot be split among the {self.batch_size} examples (does it "
                "normalize over the batch?). Use DiagGGNExact."
            )

    @staticmethod
    def _check_instance_rows(site: CurvedSite, targets: list[CallRecord]) -> None:
        """Raise unless row ``n * C + c`` of an instance normalization depends on example ``n`` only."""
        a = site.node._saved_input
        layout = (site.examples, a.shape[1] // site.examples, *a.shape[2:])
        if mixes_examples(site.sources[0], a.shape, targets, layout):
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second-order term of {type(site.node).__name__}, a normalization with "
                "statistics over rows that do not each belong to one example (batch statistics, or a layout other "
                "than F.instance_norm's). Use DiagGGNExact, or secorder_hooks.hessian_diagonal outside extend()."
            )

    @staticmethod
    def _check_products(site: CurvedSite) -> None:
        """Both factors keep the examples on dim 0: the same number of dims as the product, sizes 1 broadcast."""
        node = site.node
        out = site.grad.shape
        for shape in (node._saved_self.shape, node._saved_other.shape):
            if len(shape) != len(out) or shape[0] != out[0] or any(s not in (1, o) for s, o in zip(shape, out)):
                raise UnsupportedOperationError(
                    "the exact Hessian needs the second-order term of a broadcasting product whose factors both "
                    f"depend on a parameter (shapes {tuple(node._saved_self.shape)} and "
                    f"{tuple(node._saved_other.shape)}), and a factor does not keep the examples on dim 0 (fewer dims "
                    "than the product, or size 1 there). Expand the factors to a common shape first, or use "
                    "DiagGGNExact."
                )


RESIDUAL_BLOCK_BYTES = 64 * 2**20
"""Bytes of one block of one-hot columns of a Hessian term (the columns at the curved operation
plus the vectors they give at the records they reach) unless ``column_chunk_size`` says otherwise.

A term of an activation with ``K`` elements per example needs ``K`` columns. All at once, the
first SiLU of efficientnet_b0's second stage (``K`` = 24576 on 32x32 images, N = 2, float64)
would hold about 16 GB of columns and gradients; blocks of this size bound the memory of every
model and cost small models nothing (their ``K`` columns fit in one block).
"""


def _residual_chunk(weights: Tensor, targets: list[CallRecord], requested: int | None, sources: int = 1) -> int | None:
    """Columns per backward for a Hessian term: ``requested``, else by :data:`RESIDUAL_BLOCK_BYTES`.

    Args:
        weights: ``[N, *a]`` weights of the term (one column per element of an example).
        targets: The records the columns reach.
        requested: The session's ``column_chunk_size``.
        sources: Columns per element (2 for the polarized pairs of a product).
    """
    if requested is not None:
        return requested
    per_column = sources * weights.numel() * weights.element_size() + sum(
        math.prod(shape) * dtype.itemsize
        for rec in targets
        for shape, (dtype, _) in zip(rec.output_shapes, rec.output_kinds)
    )
    chunk = max(sources, RESIDUAL_BLOCK_BYTES // max(per_column, 1))
    return None if chunk >= weights[0].numel() * sources else chunk


def _to_factors(
    blocks: Iterator[tuple[tuple[Tensor, ...], Tensor]], shapes: tuple[torch.Size, torch.Size]
) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    """Product columns in the product's shape summed to each factor's shape (the vjp of its broadcast)."""
    for columns, weights in blocks:
        yield tuple(c.sum_to_size(c.shape[0], *shape) for c, shape in zip(columns, shapes)), weights


def _factor(node) -> Tensor:
    """The activation factor ``a`` saved by a matrix-product node (``addmm``'s ``mat1``, ``mm``'s ``self``)."""
    return node._saved_mat1 if node_name(node) == "AddmmBackward0" else node._saved_self


def _has_own_term(rule: LayerRule) -> bool:
    return type(rule).own_hessian_term is not LayerRule.own_hessian_term


def _one_hot(weights: Tensor, size: int | None, product: bool) -> Iterator[tuple[tuple[Tensor, ...], Tensor]]:
    r"""One-hot columns over the elements of one example, weighted by ``weights`` ``[N, *a]``.

    For ``product`` the columns are polarized for :math:`h = u \odot v`: pairs
    :math:`(e_j, e_j)` and :math:`(e_j, -e_j)` at the two factors, weighted by
    :math:`\pm r_j / 2`, whose weighted squares sum to :math:`2 r_j (J_u^\top e_j)(J_v^\top e_j)`.
    """
    n, shape = weights.shape[0], weights.shape[1:]
    flat = weights.reshape(n, -1).T  # [K, N]
    k = flat.shape[0]
    step = k if size is None else max(1, size // 2 if product else size)
    for start in range(0, k, step):
        stop = min(k, start + step)
        eye = torch.zeros(stop - start, k, dtype=weights.dtype, device=weights.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        cols = eye.unsqueeze(1).expand(-1, n, -1).reshape(stop - start, n, *shape)
        w = flat[start:stop]
        if product:
            yield (torch.cat([cols, cols]), torch.cat([cols, -cols])), torch.cat([w, -w]) / 2
        else:
            yield (cols,), w


def _check_site_rows(site: CurvedSite, rows: RowMap) -> None:
    """Raise if a curved operation between the model output and the loss input acts on rows that are not the examples.

    Its second-order term is weighted per row of its input, and the rules weight per example.
    """
    for source in site.sources:
        if not rows.examples_on_rows(source):
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second-order term of {type(site.node).__name__}, which acts on a tensor "
                "between the model output and the loss input whose rows are not known to be the examples in order "
                "(after a concatenation, slice, permutation or reshape of rows, or an operation the engine cannot "
                "trace). Apply the operation before rearranging rows (inside the model), or use DiagGGNExact."
            )


def _diagonal_chain_end(x: Tensor | None) -> GradientEdge | None:
    """The edge reached from ``x`` through unary elementwise nodes only (the last one before another node)."""
    if not isinstance(x, Tensor) or x.grad_fn is None:
        return None
    edge = get_gradient_edge(x)
    while node_name(edge.node) in DIAGONAL:
        index = only_input(edge.node)
        if index is None:
            return None
        edge = GradientEdge(*edge.node.next_functions[index])
    return edge


def _closed_form_record(source: GradientEdge, contributions: Contributions) -> CallRecord | None:
    """The record whose output is at ``source``, if its rule may use a closed form there.

    The closed form is exact only when every parameter of that module gets its gradient
    from this one call (no second call, no weight shared with another module).
    """
    for rec in contributions.records():
        if source in rec.output_edges and len(rec.output_edges) == 1:
            if rec.replica is not None:  # the closed forms take the call's rows as the examples
                return None
            params = rule_parameters(contributions.rules[rec.module], rec.module).values()
            if all(len(contributions.by_param.get(id(p), ())) == 1 for p in params):
                return rec
            return None
    return None
