r"""Kronecker factors and their running sums over the column blocks of one backward pass.

The Kronecker quantities (:mod:`secorder_hooks.quantities.kronecker`) use the engine's
column passes like the diagonals: the same vectors reach every recorded layer output
(exact loss-Hessian square-root columns for KFLR, sampled ones for KFAC, the captured
gradient for KFACEmpirical) and a :class:`KronSums` sink accumulates per call the output
factor :math:`B` of the rule (:meth:`~secorder_hooks.LayerRule.kronecker_output`). The
input factor :math:`A` (:meth:`~secorder_hooks.LayerRule.kronecker_input`) needs only the
recorded inputs and is computed once per call at the end. Both sum over the calls that
contribute to a parameter. Parameters of layers without a Kronecker rule get their exact
diagonal from the same columns when the quantity's ``fallback`` asks for it. EK-FAC
(:class:`EkfacSums`) then replays the columns to rotate the per-example gradients into
the factors' eigenbases (:class:`EigenSums`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from secorder_hooks.enums import ChoiceEnum
from secorder_hooks.errors import ExtensionError, UnsupportedModuleError
from secorder_hooks.quantities.base import Params, PassContext, RuleMethod, RuleResults

__all__ = ["KroneckerFactors", "WeightSharing", "KronFallback", "KronSums", "EigenSums", "EkfacSums"]

Parts = Sequence[tuple[Any, str]]


class KronOptions(Protocol):
    """The options of a Kronecker quantity (:class:`~secorder_hooks.KroneckerQuantity`) the sums follow."""

    sharing: WeightSharing
    separate_weight_and_bias: bool
    fallback: KronFallback


class KroneckerFactors(list):
    """The list of factors a Kronecker quantity attaches, remembering which one is a mean.

    Attributes:
        mean_index: Position of the input factor :math:`A` (a mean over examples), ``None``
            for a bias, a fallback diagonal or EK-FAC's bases (sums only).
    """

    def __init__(self, factors: list[torch.Tensor], mean_index: int | None = None) -> None:
        super().__init__(factors)
        self.mean_index = mean_index


class WeightSharing(ChoiceEnum):
    r"""How a Kronecker factor treats the positions ``t`` a weight is shared over.

    Positions are the leading axes of a Linear layer's input ``[N, *, I]`` other than
    dim 0, and the output locations of a convolution (its input patches). The two
    approximations are those of Eschenhagen et al. (2023), as curvlinops defines them;
    with :math:`a_{nt}` the input (patch) at position :math:`t` of :math:`T` and
    :math:`g_{vnt}` column :math:`v` at the output:
    """

    EXPAND = "expand"
    r"""Positions count as extra examples, with :math:`A = \frac{1}{NT} \sum_{n,t} a_{nt} a_{nt}^\top`,
    :math:`B = \sum_{v,n,t} w_{vn} g_{vnt} g_{vnt}^\top`. Exact for linear models with a loss
    term per position."""
    REDUCE = "reduce"
    r"""Positions are pooled first, with :math:`A = \frac1N \sum_n \bar a_n \bar a_n^\top` with
    :math:`\bar a_n = \frac1T \sum_t a_{nt}`, :math:`B = \sum_{v,n} w_{vn} \bar g_{vn} \bar g_{vn}^\top`
    with :math:`\bar g_{vn} = \sum_t g_{vnt}`. Exact for linear models whose positions are
    averaged before the loss."""


class KronFallback(ChoiceEnum):
    """What a Kronecker quantity does for a parameter whose layer has no Kronecker rule."""

    ERROR = "error"
    """Raise :class:`~secorder_hooks.UnsupportedModuleError` when ``extend()`` starts."""
    DIAGONAL = "diagonal"
    """Attach ``[d]``: the exact diagonal ``d`` (1-D, ``p.numel()`` entries, row-major) of the
    parameter's block of the same curvature matrix (e.g. ``diag_ggn_exact.flatten()`` for
    :class:`KFLR`)."""


class KronSums:
    """Running sums of the output factors of one Kronecker quantity, and its fallback diagonals.

    Args:
        quantity: The Kronecker quantity.
    """

    def __init__(self, quantity: KronOptions) -> None:
        self.quantity = quantity
        self.outputs: dict[int, Tensor] = {}
        """Record id -> running :math:`B` (``[G, O, O]``)."""
        self.diagonals: dict[int, Tensor] = {}
        """Parameter id -> running exact diagonal (fallback parameters)."""

    def accumulate(self, results: RuleResults, params: Params) -> None:
        """Add the output factors (and fallback diagonals) of one block of vectors."""
        rules = results.contributions.rules
        done: set[int] = set()
        for key, parts in params:
            if not all(results.implements(rec.module, RuleMethod.KRONECKER) for rec, _ in parts):
                value = results.weighted_squared_sum(parts, per_example=False)
                self.diagonals[key] = value if key not in self.diagonals else self.diagonals[key] + value
                continue
            for rec, _ in parts:
                if id(rec) in done:
                    continue
                done.add(id(rec))
                b = rules[rec.module].kronecker_output(
                    rec.module, rec.inputs, results.grad_outputs(rec), results.weights, self.quantity.sharing
                )
                prev = self.outputs.get(id(rec))
                self.outputs[id(rec)] = b if prev is None else prev + b

    def factors(self, context: PassContext) -> dict[int, KroneckerFactors]:
        """Parameter id -> its factors (``[d]`` for a fallback diagonal; a folded bias has none)."""
        q = self.quantity
        inputs: dict[int, Tensor] = {}
        result: dict[int, list[Tensor]] = {}
        contributions = context.contributions
        for key, parts in contributions.by_param.items():
            p = context.params[key]
            kron = all(context.implements(r.module, RuleMethod.KRONECKER) for r, _ in parts)
            if key in self.diagonals or not kron:
                if q.fallback is KronFallback.ERROR:  # extend() raised already (Needs.rule_methods)
                    raise UnsupportedModuleError(
                        f"{type(q).__name__}: parameter '{context.param_names[key]}' has no Kronecker rule."
                    )
                diag = self.diagonals.get(key)
                result[key] = KroneckerFactors([p.new_zeros(p.numel()) if diag is None else diag.flatten()])
                continue
            factors = self._factors(contributions, key, parts, inputs)
            if factors is not None:
                result[key] = factors
        return result

    def finish(self, context: PassContext) -> Mapping[int, KroneckerFactors]:
        """The factors of every contributing parameter."""
        return self.factors(context)

    def _factors(
        self, contributions: Any, key: int, parts: Parts, inputs: dict[int, Tensor]
    ) -> KroneckerFactors | None:
        """``[B, A]`` (weight) or ``[B]`` (bias) summed over ``parts``; ``None`` for a bias folded into its weight."""
        q = self.quantity
        b_total: Tensor | None = None
        a_total: Tensor | None = None
        for rec, name in parts:
            if name not in ("weight", "bias"):
                raise ExtensionError(
                    f"{type(q).__name__}: the Kronecker rule of {type(rec.module).__name__} covers 'weight' and "
                    f"'bias', not '{name}'."
                )
            bias_param = getattr(rec.module, "bias", None)
            fold = not q.separate_weight_and_bias and isinstance(bias_param, Tensor) and bias_param.requires_grad
            if name == "bias" and fold:
                return None
            if name == "bias":
                a = None  # the constant coordinate's moment: 1 for every call
            else:
                if id(rec) not in inputs:
                    rule = contributions.rules[rec.module]
                    inputs[id(rec)] = rule.kronecker_input(rec.module, rec.inputs, q.sharing, fold)
                a = inputs[id(rec)]  # [G, I', I']
            b = self.outputs.get(id(rec))
            if b is None:  # no vector reached this call: its B is zero
                zeros = rec.zeros_like_output(0, (1,))
                b = contributions.rules[rec.module].kronecker_output(rec.module, rec.inputs, zeros, None, q.sharing)
            if a is not None and a_total is not None and a_total.shape != a.shape:
                raise ExtensionError(
                    f"{type(q).__name__}: parameter '{rec.name}.{name}' is shared by calls whose input factors "
                    f"differ in shape ({tuple(a_total.shape)} and {tuple(a.shape)}; one has a bias)."
                )
            if a is not None:
                a_total = a if a_total is None else a_total + a
            b_total = b if b_total is None else b_total + b
        assert b_total is not None
        if a_total is None:  # a bias: B times the summed moment of the constant coordinate, one per call
            scaled = b_total * len(parts)  # a new tensor: the weight's factor holds the same B
            return KroneckerFactors([scaled[0] if scaled.shape[0] == 1 else torch.block_diag(*scaled)])
        factors = [b_total[0], a_total[0]] if b_total.shape[0] == 1 else [b_total, a_total]
        if contributions.rules[parts[0][0].module].kronecker_input_first:
            return KroneckerFactors(factors[::-1], mean_index=0)
        return KroneckerFactors(factors, mean_index=1)


class EigenSums:
    r"""The corrected diagonals :math:`S = \sum_{v,n} w_{vn} (Q_{out}^\top G_{vn} Q_{in})^{\odot 2}` of EK-FAC.

    Args:
        factors: Parameter id -> Kronecker factors (of :class:`KronSums`, in attribute order).
        contributions: The contributing calls.
        quantity: The EK-FAC quantity (its options say whether the bias is folded in).
    """

    def __init__(self, factors: Mapping[int, list[torch.Tensor]], contributions: Any, quantity: KronOptions) -> None:
        self.quantity = quantity
        self.bases: dict[int, list[Tensor]] = {}
        self.input_first: dict[int, bool] = {}
        self.sums: dict[int, Tensor] = {}
        self.fallback: dict[int, KroneckerFactors] = {}
        for key, fs in factors.items():
            if fs[0].dim() == 1:  # a fallback diagonal stays as it is
                self.fallback[key] = fs
                continue
            rec = contributions.by_param[key][0][0]
            self.input_first[key] = contributions.rules[rec.module].kronecker_input_first
            self.bases[key] = [torch.linalg.eigh(f).eigenvectors for f in fs]

    def accumulate(self, results: RuleResults, params: Params) -> None:
        """Add the squared per-example gradients of one block of vectors, rotated into the eigenbases."""
        for key, parts in params:
            if key not in self.bases:
                continue
            grads = results.per_example_grads(parts)  # [V, N, *p], summed over the calls
            if len(self.bases[key]) == 1:  # a bias [V, N, O]
                rotated = grads @ self.bases[key][0]
            else:
                rotated = self._rotated_weight(key, grads, parts, results)
            squares = rotated.square()
            if results.weights is not None:
                squares = squares * results.weights.reshape(*results.weights.shape, *([1] * (squares.dim() - 2)))
            total = squares.sum((0, 1))
            self.sums[key] = total if key not in self.sums else self.sums[key] + total

    def _rotated_weight(self, key: int, grads: Tensor, parts: Parts, results: RuleResults) -> Tensor:
        """``Q_out^T G Q_in`` of weight gradients ``[V, N, *p]``: ``[V, N, (G,) O, I']``, a folded bias last."""
        first, second = self.bases[key]
        if self.input_first[key]:  # rows index the input: [V, N, E, D]
            return first.mT @ grads @ second
        v, n = grads.shape[:2]
        grouped = first.dim() == 3
        q_out, q_in = (first, second) if grouped else (first.unsqueeze(0), second.unsqueeze(0))
        groups = q_out.shape[0]
        matrix = grads.reshape(v, n, groups, grads.shape[2] // groups, -1)  # [V, N, G, O/G, I]
        if q_in.shape[-1] == matrix.shape[-1] + 1:  # the bias folded in as the last input coordinate
            bias = parts[0][0].module.bias
            bias_grads = results.per_example_grads(results.contributions.by_param[id(bias)])
            matrix = torch.cat([matrix, bias_grads.reshape(v, n, groups, -1, 1)], dim=-1)
        rotated = q_out.mT @ matrix @ q_in
        return rotated if grouped else rotated[:, :, 0]

    def finish(self, context: PassContext) -> Mapping[int, KroneckerFactors]:
        """``[*eigenbases, S]`` (or a fallback diagonal) of every parameter."""
        result: dict[int, KroneckerFactors] = dict(self.fallback)
        for key, bases in self.bases.items():
            total = self.sums.get(key)
            if total is None:
                total = bases[0].new_zeros(*bases[0].shape[:-2], *(b.shape[-1] for b in bases))
            result[key] = KroneckerFactors([*bases, total])
        return result


class EkfacSums:
    """The sink of EK-FAC: :class:`KronSums` of the columns, then a replay of them into :class:`EigenSums`.

    Args:
        quantity: The EK-FAC quantity (its options).
    """

    def __init__(self, quantity: KronOptions) -> None:
        self.quantity = quantity
        self.kron = KronSums(quantity)

    def accumulate(self, results: RuleResults, params: Params) -> None:
        """Add the output factors of one block of vectors."""
        self.kron.accumulate(results, params)

    def finish(self, context: PassContext) -> Mapping[int, KroneckerFactors]:
        """Eigenbases of the factors, and the corrected diagonals of a second pass of the columns."""
        eigen = EigenSums(self.kron.factors(context), context.contributions, self.quantity)
        context.replay(eigen, chunk_size=1)
        return eigen.finish(context)
