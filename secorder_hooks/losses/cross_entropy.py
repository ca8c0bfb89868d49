r"""Cross-entropy over logits and negative log-likelihood over ``log_softmax`` outputs.

Both are, as functions of the logits :math:`x` (class axis 1 of ``[N, C, *d]``), a sum
over positions :math:`i` (an example ``n`` and a location in ``*d``) of

.. math::
    L = \sum_i \big(-\textstyle\sum_c q_{ic} \log \operatorname{softmax}(x_i)_c\big)
    \quad\Rightarrow\quad
    \frac{\partial^2 L}{\partial x_i^2} = a_i \big(\operatorname{diag}(p_i) - p_i p_i^\top\big),
    \qquad a_i = \textstyle\sum_c q_{ic},

with :math:`p_i = \operatorname{softmax}(x_i)`, since the Hessian of every
:math:`-\log \operatorname{softmax}(x)_c` is :math:`\operatorname{diag}(p) - pp^\top`. PyTorch's
options only change :math:`a_i` (the reduction factor :math:`c` included):

* class indices :math:`y_i`, class weights :math:`w`, label smoothing :math:`\varepsilon`:
  :math:`a_i = c\,[(1-\varepsilon)\, w_{y_i} + \tfrac{\varepsilon}{C} \sum_c w_c]`, zero where
  :math:`y_i` is ``ignore_index``; ``mean``: :math:`c = 1 / \sum_{i \text{ counted}} w_{y_i}`.
* class probabilities :math:`t_i`: :math:`a_i = c \sum_c w_c [(1-\varepsilon) t_{ic} + \varepsilon / C]`;
  ``mean``: :math:`c = 1 / (\text{number of positions})`.

Exact square root: column :math:`k` of position :math:`i` is
:math:`\sqrt{a_i p_{ik}}\,(e_k - p_i)`, because
:math:`\sum_k p_k (e_k - p)(e_k - p)^\top = \operatorname{diag}(p) - pp^\top`. Monte-Carlo: the
same expectation with :math:`k \sim p_i` sampled.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import GradientEdge

from secorder_hooks.autodiff.graph import saved_int
from secorder_hooks.errors import LossDtypeError, LossInputError, UnsupportedLossError
from secorder_hooks.losses.base import LossCall, LossTerm, SqrtColumns, edge_of, signed_sqrt
from secorder_hooks.losses.calls import standard_loss
from secorder_hooks.losses.kinds import LossKind, Reduction

__all__ = ["CrossEntropyLossTerm", "NLLLossTerm", "SoftmaxLossTerm", "check_class_range"]


class SoftmaxLossTerm(LossTerm):
    r"""Loss with Hessian :math:`a_i (\operatorname{diag}(p_i) - p_i p_i^\top)` at every position of the logits.

    Args:
        probs: ``[N, C, *d]`` softmax probabilities over axis 1 (detached).
        factors: ``[N, *d]`` factors :math:`a_i`, reduction factor included.
        edge: Gradient edge of the logits.
        name: Name used in messages.
        nonnegative: The factors are known to be ``>= 0`` (no class weights): their signs
            need no check.
    """

    def __init__(
        self, probs: Tensor, factors: Tensor, edge: GradientEdge | None, name: str, nonnegative: bool = False
    ) -> None:
        self.probs, self.factors, self.edge, self.name = probs, factors, edge, name
        self.nonnegative = nonnegative
        self.shape = probs.shape

    def sqrt_hessian(self) -> SqrtColumns:
        r"""``K = (C - 1) * prod(d)`` exact columns; column ``(k, j)`` lives at position ``j`` only.

        Returns:
            Columns ``[(C - 1) * prod(d), N, C, *d]`` (class-major order; one column for
            ``C = 1``) and weights ``[K, N]`` (signs of :math:`a`, ``None`` where all
            :math:`a \ge 0`). Positions need separate columns: sharing one column across
            positions would add cross-position terms to the example's block.
        """
        n, n_classes, positions = self.shape[0], self.shape[1], self.shape[2:]
        n_pos = math.prod(positions)
        p = self.probs.reshape(n, n_classes, n_pos)
        scale, sign = signed_sqrt(self.factors.reshape(n, n_pos), self.nonnegative)  # [N, D]
        cols = _rank_deficient_sqrt(p) * scale[None, :, None, :]  # [C - 1, N, C, D]
        n_classes = cols.shape[0]
        if n_pos == 1:
            columns = cols.reshape(n_classes, *self.shape)
            weights = None if sign is None else sign.T.expand(n_classes, n)
            return SqrtColumns(columns, weights)
        local = torch.eye(n_pos, dtype=p.dtype, device=p.device)
        columns = torch.einsum("kncj,ji->kjnci", cols, local).reshape(n_classes * n_pos, *self.shape)
        weights = None if sign is None else sign.T[None].expand(n_classes, n_pos, n).reshape(-1, n)
        return SqrtColumns(columns, weights)

    def sample_sqrt_hessian(self, mc_samples: int, generator: torch.Generator | None = None) -> Tensor:
        r"""``[M, N, C, *d]`` columns :math:`\sqrt{a_i / M}\,(p_i - e_{y_{mi}})` with :math:`y_{mi} \sim p_i`.

        Targets are drawn independently per sample and position, so cross-position terms vanish
        in expectation and one column per sample suffices.
        """
        if not self.nonnegative and bool((self.factors < 0).any()):
            raise UnsupportedLossError(
                f"{self.name}: Monte-Carlo sampling needs non-negative per-position weights; this loss has "
                f"negative ones (negative class weights or targets). Use an exact quantity instead."
            )
        n_classes = self.shape[1]
        flat = self.probs.movedim(1, -1).reshape(-1, n_classes)  # [N*D, C]
        one_hot = torch.zeros(mc_samples, *flat.shape, dtype=flat.dtype, device=flat.device)
        one_hot.scatter_(2, _sample_classes(flat, mc_samples, generator), 1.0)  # [M, N*D, C]
        scale = (self.factors.reshape(-1, 1) / mc_samples).sqrt_()
        cols = (flat - one_hot).mul_(scale)
        return cols.reshape(mc_samples, self.shape[0], *self.shape[2:], n_classes).movedim(-1, 2)


def _sample_classes(probs: Tensor, mc_samples: int, generator: torch.Generator | None = None) -> Tensor:
    r"""``[M, R, 1]`` class indices :math:`y_{mr} \sim \mathrm{Categorical}(p_r)`, drawn independently.

    Inversion of the cumulative distribution: :math:`y = \#\{k < C - 1 : P_k \le u P_{C-1}\}`
    with :math:`P_k = \sum_{j \le k} p_j` and :math:`u \sim U[0, 1)`. A class of zero
    probability is never drawn (its :math:`P_k` equals :math:`P_{k-1}`), except the last one
    when rounding makes :math:`u P_{C-1}` equal :math:`P_{C-1}`. Five small kernels:
    9 against 38 us for ``torch.multinomial`` on ``[128, 10]``.

    Args:
        probs: ``[R, C]`` probabilities over the last axis (need not be normalized).
        mc_samples: ``M``.
        generator: Source of the uniform draws.
    """
    cdf = probs.cumsum(-1)
    u = torch.rand(mc_samples, probs.shape[0], 1, dtype=probs.dtype, device=probs.device, generator=generator)
    return (cdf[:, :-1] <= u.mul_(cdf[:, -1:])).sum(-1, keepdim=True)


def _rank_deficient_sqrt(p: Tensor) -> Tensor:
    r"""``[C - 1, N, C, D]`` columns :math:`S` with :math:`S S^\top = \operatorname{diag}(p) - p p^\top` per ``(n, d)``.

    :math:`B = \operatorname{diag}(q) - p q^\top` with :math:`q = \sqrt{p}` is a square root
    with :math:`B q = 0`. The Householder reflection :math:`P` that maps :math:`q` to the unit
    vector :math:`e_m` of the least likely class keeps :math:`(BP)(BP)^\top = B B^\top` and
    zeroes column ``m`` of :math:`BP`. With :math:`u = q - e_m`, :math:`u^\top u = 2 - 2 q_m`
    (at least :math:`2 - 2/\sqrt{C}`) and :math:`B u = q_m (p - e_m)`, the other columns are

    .. math::
        (BP)_k = q_k \Big(e_k + \frac{q_m}{1 - q_m} e_m - \frac{p}{1 - q_m}\Big), \qquad k \ne m,

    so dropping column ``m`` leaves ``C - 1`` columns and the column backward does ``1/C``
    less work. Column ``j`` is class ``j``, except that class ``C - 1`` takes the place of
    ``m``. ``C = 1`` keeps its one (zero) column.

    Args:
        p: ``[N, C, D]`` probabilities over axis 1.
    """
    n_classes = p.shape[1]
    if n_classes == 1:
        return torch.zeros_like(p).unsqueeze(0)
    q = p.sqrt()
    m = p.argmin(1, keepdim=True)  # [N, 1, D]
    q_m = q.gather(1, m)
    inv = (1 - q_m).reciprocal_()
    shared = (p * inv).neg_().scatter_add_(1, m, q_m * inv)  # e_m q_m / (1 - q_m) - p / (1 - q_m)
    classes = torch.arange(n_classes, device=p.device)
    k = classes[:-1].view(-1, 1, 1, 1)
    k = torch.where(k == m, n_classes - 1, k)  # [C - 1, N, 1, D]: the class of each column
    q_k = q.unsqueeze(0).expand(n_classes - 1, -1, -1, -1).gather(2, k)
    return (shared + (k == classes.view(-1, 1)).to(p.dtype)).mul_(q_k)


def _check_logits(x: Tensor, name: str) -> None:
    if x.dim() < 2:
        raise UnsupportedLossError(
            f"{name} on an unbatched input of shape {tuple(x.shape)}: pass a batch [N, C, *d] "
            f"(e.g. input.unsqueeze(0)), dim 0 is the example axis."
        )


def _index_target_factors(
    target: Tensor,
    n_classes: int,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    label_smoothing: float,
    dtype: torch.dtype,
) -> Tensor:
    """``[N, *d]`` factors :math:`a_i` for class-index targets (see module docstring)."""
    mask = target != ignore_index
    counted = mask.to(dtype)
    if weight is None:
        w_target = counted
        w_total = float(n_classes)
    else:
        weight = weight.detach().to(dtype)
        w_target = weight[target.masked_fill(~mask, 0)] * counted
        w_total = weight.sum()
    factors = w_target
    if label_smoothing:
        factors = (1.0 - label_smoothing) * w_target + (label_smoothing / n_classes) * w_total * counted
    if reduction is Reduction.MEAN:
        factors = factors / w_target.sum()
    return factors


def _check_index_target(x: Tensor, target: Tensor, name: str) -> None:
    expected = (x.shape[0], *x.shape[2:])
    if target.shape != expected:
        raise LossInputError(
            f"{name}: class-index target has shape {tuple(target.shape)}, expected {expected} for input "
            f"{tuple(x.shape)} (classes on axis 1)."
        )


@standard_loss(F.cross_entropy, LossKind.NLL, loss_type=True)
class CrossEntropyLossTerm(SoftmaxLossTerm):
    """``F.cross_entropy(logits, target, ...)`` as a function of the logits ``[N, C, *d]``.

    Supports class-index targets (``[N, *d]``, integer) and class-probability targets (floating,
    shape of ``logits``), ``weight``, ``ignore_index``, ``label_smoothing``, ``mean``/``sum``.
    """

    def __init__(
        self,
        logits: Tensor,
        target: Tensor,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str | Reduction = "mean",
        label_smoothing: float = 0.0,
    ) -> None:
        name = "cross_entropy"
        _check_logits(logits, name)
        red = Reduction.parse(reduction, f"{name}: reduction")
        x = logits.detach()
        n_classes = x.shape[1]
        if target.is_floating_point():
            if target.shape != x.shape:
                raise LossInputError(
                    f"{name}: probability target has shape {tuple(target.shape)}, expected the input's "
                    f"{tuple(x.shape)} (or pass integer class indices)."
                )
            t = target.detach().to(x.dtype) * (1.0 - label_smoothing) + label_smoothing / n_classes
            if weight is not None:
                view = [1, n_classes] + [1] * (x.dim() - 2)
                t = t * weight.detach().to(x.dtype).reshape(view)
            factors = t.sum(1)
            if red is Reduction.MEAN:
                factors = factors / (x.numel() // n_classes)
        else:
            _check_index_target(x, target, name)
            factors = _index_target_factors(target, n_classes, weight, ignore_index, red, label_smoothing, x.dtype)
        nonnegative = weight is None and not target.is_floating_point()
        super().__init__(torch.softmax(x, dim=1), factors, edge_of(logits), name, nonnegative)

    @classmethod
    def from_call(cls, call: LossCall) -> CrossEntropyLossTerm:
        """The term of a recorded ``F.cross_entropy`` call."""
        opts = call.options
        return cls(
            call.input,
            call.target,
            weight=opts.get("weight"),
            ignore_index=opts.get("ignore_index", -100),
            reduction=opts.get("reduction", "mean"),
            label_smoothing=opts.get("label_smoothing", 0.0),
        )

    @classmethod
    def check_targets(cls, call: LossCall) -> None:
        """Integer class indices ``[N, *d]``, or class probabilities shaped like the logits."""
        _check_categorical_targets(call, probabilities=True)

    @classmethod
    def averaged_terms(cls, call: LossCall) -> float:
        """Positions (``numel / C``) for probability targets, else the summed weights of the counted targets."""
        return _categorical_terms(call)


def _check_categorical_targets(call: LossCall, probabilities: bool) -> None:
    """Targets of a categorical loss: see :meth:`CrossEntropyLossTerm.check_targets`."""
    x, y, name = call.input, call.target, call.name
    if x.dim() < 2:
        raise LossInputError(
            f"{name} got a prediction of shape {tuple(x.shape)}; it needs [N, C, ...] (dim 0 indexes "
            "examples, dim 1 classes)."
        )
    if probabilities and y.is_floating_point():
        if y.shape != x.shape:
            raise LossInputError(
                f"{name} with class probabilities needs targets of the prediction's shape "
                f"{tuple(x.shape)}, got {tuple(y.shape)}{_batch_note(x, y)}."
            )
        return
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise LossDtypeError(f"{name} needs integer class-index targets (torch.long), got dtype {y.dtype}.")
    expected = (x.shape[0], *x.shape[2:])
    if tuple(y.shape) != expected:
        raise LossInputError(
            f"{name} with prediction {tuple(x.shape)} needs targets {expected}, got shape {tuple(y.shape)}"
            f"{_batch_note(x, y)}."
        )


def check_class_range(call: LossCall) -> None:
    """Class indices in ``[0, C)`` or equal to ``ignore_index`` (one reduction and one sync, more if negative).

    Raises:
        LossInputError: A class index out of range.
    """
    y, n_classes = call.target, call.input.shape[1]
    if y.is_floating_point() or not y.numel():
        return
    low, high = (int(v) for v in torch.aminmax(y))
    if low < 0:  # negative entries other than ignore_index?
        counted = y[y != call.options.get("ignore_index", -100)]
        low, high = (int(counted.min()), int(counted.max())) if counted.numel() else (0, 0)
    if low < 0 or high >= n_classes:
        raise LossInputError(
            f"{call.name}: class indices must lie in [0, {n_classes}) for a prediction with {n_classes} classes "
            f"on axis 1 (or equal ignore_index); got range [{low}, {high}]."
        )


def _batch_note(x: Tensor, y: Tensor) -> str:
    """A note on mismatched batch sizes (dim 0), or nothing."""
    if y.dim() == 0 or y.shape[0] == x.shape[0]:
        return ""
    return f" (batch size {y.shape[0]} against {x.shape[0]}: dim 0 is the example axis)"


def _categorical_terms(call: LossCall) -> float:
    """:meth:`CrossEntropyLossTerm.averaged_terms` (also for ``F.nll_loss``)."""
    x, y = call.input, call.target
    if y.is_floating_point():
        return float(x.numel() // x.shape[1])
    keep = y != call.options.get("ignore_index", -100)
    weight = call.options.get("weight")
    weighted = keep if weight is None else weight[y.clamp(0, weight.numel() - 1)] * keep
    return float(weighted.sum())


def _log_softmax_edge(log_probs: Tensor, name: str) -> GradientEdge | None:
    """Edge of the input of the ``log_softmax`` over axis 1 that produced ``log_probs``."""
    node = log_probs.grad_fn
    if node is None or node.name() != "LogSoftmaxBackward0":
        found = "no autograd history" if node is None else node.name()
        raise UnsupportedLossError(
            f"{name}: the loss Hessian is known only when the input is the direct output of "
            f"log_softmax over the class axis (found {found}). Use F.cross_entropy on the logits, or "
            f"apply log_softmax(dim=1) immediately before {name}."
        )
    dim = saved_int(node, "_saved_dim")
    if dim % log_probs.dim() != 1:
        raise UnsupportedLossError(
            f"{name}: log_softmax was taken over dim {dim} of a {log_probs.dim()}-d input, but the classes "
            f"of {name} are on dim 1; take log_softmax over dim 1."
        )
    next_node, input_nr = node.next_functions[0]
    return None if next_node is None else GradientEdge(next_node, input_nr)


@standard_loss(F.nll_loss, LossKind.NLL)
class NLLLossTerm(SoftmaxLossTerm):
    """``F.nll_loss(log_softmax(logits, 1), target, ...)`` as a function of the logits.

    The Hessian of ``nll_loss`` with respect to its own input is zero; the curvature lives at
    the logits, so :attr:`edge` is the input edge of the ``log_softmax`` node.

    Raises:
        UnsupportedLossError: ``log_probs`` is not the direct output of ``log_softmax`` over axis 1.
    """

    def __init__(
        self,
        log_probs: Tensor,
        target: Tensor,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: str | Reduction = "mean",
    ) -> None:
        name = "nll_loss"
        _check_logits(log_probs, name)
        red = Reduction.parse(reduction, f"{name}: reduction")
        edge = _log_softmax_edge(log_probs, name)
        x = log_probs.detach()
        if target.is_floating_point():
            raise LossInputError(f"{name}: target must hold integer class indices, got {target.dtype}.")
        _check_index_target(x, target, name)
        factors = _index_target_factors(target, x.shape[1], weight, ignore_index, red, 0.0, x.dtype)
        super().__init__(x.exp(), factors, edge, name, nonnegative=weight is None)

    @classmethod
    def from_call(cls, call: LossCall) -> NLLLossTerm:
        """The term of a recorded ``F.nll_loss`` call."""
        opts = call.options
        return cls(
            call.input,
            call.target,
            weight=opts.get("weight"),
            ignore_index=opts.get("ignore_index", -100),
            reduction=opts.get("reduction", "mean"),
        )

    @classmethod
    def check_targets(cls, call: LossCall) -> None:
        """Integer class indices ``[N, *d]``."""
        _check_categorical_targets(call, probabilities=False)

    @classmethod
    def averaged_terms(cls, call: LossCall) -> float:
        """The summed weights of the counted targets (their count without weights)."""
        return _categorical_terms(call)
