r"""What a quantity is: what it needs from the engine, how it computes, accumulates and attaches.

A :class:`Quantity` is a small frozen dataclass that declares its :class:`Needs` (which
vectors the engine backpropagates to the recorded layer outputs, :class:`Columns`, and
which rule methods it calls, :class:`RuleMethod`) and makes a :class:`Sink` for every
backward pass. The engine knows no quantity by name: it feeds each sink the rule results
of the vectors the quantity asked for, asks it for its per-parameter values, combines
them with the earlier passes by the quantity's :class:`~secorder_hooks.Accumulation`
(:meth:`~secorder_hooks.Quantity.combine`) and writes them with :meth:`~secorder_hooks.Quantity.attach`.

The engine's side of the contract is described by two protocols: :class:`RuleResults`
(the rule results of one block of vectors) and :class:`PassContext` (the parameters of
the pass). This module depends on ``torch`` and :mod:`secorder_hooks.errors` only.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn

from secorder_hooks.errors import ExtensionError

__all__ = [
    "Quantity",
    "Order",
    "Accumulation",
    "ShardScaling",
    "Columns",
    "RuleMethod",
    "Needs",
    "Sink",
    "RuleResults",
    "PassContext",
    "Params",
    "BlockSums",
]


class Order(enum.Enum):
    """Which backward passes a quantity needs (:attr:`Needs.columns` says it in detail)."""

    FIRST = "first"
    """Computed from the output gradients of the ordinary backward pass."""
    SECOND = "second"
    """Needs columns of a curvature square root backpropagated through the model."""


class Accumulation(enum.Enum):
    r"""How a quantity of several backward passes (micro-batches) combines, as ``.grad`` does.

    With passes :math:`b = 1, \dots, k` of :math:`N_b` examples since ``.grad`` was last
    reset, the result equals the quantity of one batch of the concatenated examples, each
    example's term carrying the reduction factor :math:`c_b` of its own pass.
    """

    SUM = "sum"
    """A sum over examples; the passes' values add up (``sum_grad_squared``, the diagonals)."""
    CONCATENATE = "concatenate"
    """One row per example; the passes' values are concatenated along dim 0 (``grad_batch``)."""
    VARIANCE = "variance"
    """The variance over all examples of the passes, from their running sums (``variance``)."""
    KRONECKER = "kronecker"
    """Kronecker factors (a :class:`~secorder_hooks.quantities.KroneckerFactors` list): the output
    factors and diagonals add up, the input factor (a mean over examples) becomes the mean over
    all examples of the passes."""


@dataclass(frozen=True)
class ShardScaling:
    r"""How the value of a quantity in one backward pass depends on the batch.

    The value is :math:`T = c^k N^{-m} \sum_n q_n` (a sum over examples:
    :attr:`~secorder_hooks.Accumulation.SUM`, and the sum of squares that :attr:`~secorder_hooks.Accumulation.VARIANCE`
    keeps) or has the rows :math:`T_n = c^k N^{-m} q_n` (:attr:`~secorder_hooks.Accumulation.CONCATENATE`),
    where :math:`q_n` depends on example :math:`n` alone, :math:`c` is the reduction factor
    of the loss and :math:`N` the number of examples. Split the batch into shards
    :math:`r` with factors :math:`c_r` and sizes :math:`N_r`: the batch's value is
    :math:`T = \sum_r w_r T^{(r)}` (rows: :math:`T_n = w_r T^{(r)}_n` for :math:`n` in
    shard :math:`r`) with

    .. math::
        w_r = (c / c_r)^k \, (N_r / N)^m,

    where :math:`c / c_r = D_r / D` for ``reduction="mean"`` (:math:`D` the number of
    averaged terms) and :math:`1` for ``"sum"``.

    Attributes:
        c_power: :math:`k`, the power of the reduction factor.
        example_power: :math:`m`, the power of :math:`1/N` (1 for a mean over examples).
    """

    c_power: int
    example_power: int = 0


class Columns(enum.Enum):
    r"""Which vectors the engine backpropagates to the recorded layer outputs for a quantity.

    A block of ``V`` vectors reaches each call's output as ``[V, N, *out]`` with optional
    ``[V, N]`` weights :math:`w_{vn}`, chosen so that :math:`\sum_v w_{vn} s_{vn} s_{vn}^\top`
    is the matrix named below for example :math:`n`.
    """

    GRADIENT = "gradient"
    r"""The gradient of :math:`L` at each output, captured in the ordinary backward pass (``V = 1``,
    no weights): first-order quantities."""
    EXACT = "exact"
    r"""Columns of a square root of the loss Hessian :math:`\partial^2 L / \partial f_n^2`
    (:math:`C - 1` or :math:`C` per example and output position): the GGN."""
    SAMPLED = "sampled"
    r""":attr:`Needs.samples` Monte-Carlo columns per example, gradients of the loss at targets drawn
    from the model's predictive distribution scaled by :math:`1/\sqrt{M}`: an unbiased estimate of
    the GGN. Each quantity draws its own."""
    HESSIAN = "hessian"
    """The :attr:`EXACT` columns, plus the second-order terms of every curved operation between a
    parameter and the loss, which the engine gives as diagonals (:meth:`Sink.add_terms`)."""


class RuleMethod(enum.Enum):
    """A method of :class:`~secorder_hooks.LayerRule` a quantity calls.

    The engine checks, when :func:`~secorder_hooks.extend` starts, that the rule of every
    module with trainable parameters implements the methods in :attr:`Needs.rule_methods`
    (the first three have correct defaults in every rule).
    """

    PER_EXAMPLE_GRADS = "per_example_grads"
    """:meth:`~secorder_hooks.LayerRule.per_example_grads`."""
    WEIGHTED_SQUARED_SUM = "weighted_squared_sum"
    """:meth:`~secorder_hooks.LayerRule.weighted_squared_sum`."""
    SQUARED_NORMS = "squared_norms"
    """:meth:`~secorder_hooks.LayerRule.squared_norms`."""
    KRONECKER = "kronecker"
    """:meth:`~secorder_hooks.LayerRule.kronecker_input` and :meth:`~secorder_hooks.LayerRule.kronecker_output`."""


@dataclass(frozen=True)
class Needs:
    """What a quantity needs from the engine in each backward pass.

    Attributes:
        columns: The vectors backpropagated to the layer outputs.
        per_example: Whether the quantity keeps the example axis (the engine then gives the
            second-order terms of :attr:`Columns.HESSIAN` per example).
        rule_methods: Rule methods every covered module's rule must implement.
        undefined_when_coupled: When rows of the loss input depend on several examples (a
            reshape merging examples), what is undefined, completing "... so the loss couples
            the examples and <this> undefined" (e.g. ``"per-example curvature is"``); the
            engine raises before any work. ``None`` for a sum over examples that stays defined.
        samples: Monte-Carlo columns per example for :attr:`Columns.SAMPLED`.
        generator: Generator of the samples (``None``: torch's global one).
    """

    columns: Columns
    per_example: bool = False
    rule_methods: frozenset[RuleMethod] = frozenset()
    undefined_when_coupled: str | None = None
    samples: int = 0
    generator: torch.Generator | None = field(default=None, compare=False)


Params = Sequence[tuple[int, Sequence[tuple[Any, str]]]]
"""``(parameter id, its contributing (call record, parameter name) pairs)`` a block reaches."""


class RuleResults(Protocol):
    r"""The rule results of one block of ``V`` vectors at the recorded outputs (the engine's ``ColumnResults``).

    Every method takes the contributing ``(record, name)`` pairs of one parameter and sums
    per-example gradients over them before anything is squared. Results are cached, so
    sinks that ask for the same thing share the work.

    Attributes:
        contributions: The contributing calls (``by_param``: parameter id -> pairs; ``rules``:
            module -> rule).
        weights: ``[V, N]`` weights of the vectors, or ``None`` (all ones).
    """

    contributions: Any
    weights: torch.Tensor | None

    def grad_outputs(self, record: Any) -> Any:
        """``[V, N, *out]`` vectors at the output of ``record`` (a tuple of them for several outputs)."""

    def per_example_grads(self, parts: Sequence[tuple[Any, str]]) -> Tensor:
        """``[V, N, *p]`` per-example gradients of each vector."""

    def weighted_squared_sum(self, parts: Sequence[tuple[Any, str]], per_example: bool) -> Tensor:
        r""":math:`\sum_v w_{vn} (g^{(v)}_n)^2`, ``[N, *p]`` if ``per_example`` else summed over ``n`` (``p.shape``)."""

    def squared_norms(self, parts: Sequence[tuple[Any, str]]) -> Tensor:
        r"""``[V, N]``: :math:`\|g^{(v)}_n\|^2`."""

    def implements(self, module: nn.Module, method: RuleMethod) -> bool:
        """Whether the rule of ``module`` implements ``method``."""


class PassContext(Protocol):
    """The engine's view of one backward pass, handed to :meth:`Sink.finish`.

    Attributes:
        contributions: The contributing calls (``by_param``, ``rules``).
        params: Parameter id -> parameter.
        param_names: Parameter id -> its name in the model.
        batch_size: Number of examples ``N`` of the pass.
    """

    contributions: Any
    params: Mapping[int, torch.Tensor]
    param_names: Mapping[int, str]
    batch_size: int

    def replay(self, sink: Sink, chunk_size: int | None = None) -> None:
        """Feed ``sink`` the quantity's columns once more (at most ``chunk_size`` per block): a second stage."""

    def implements(self, module: nn.Module, method: RuleMethod) -> bool:
        """Whether the rule of ``module`` implements ``method``."""


class Sink(Protocol):
    """The running state of one quantity in one backward pass.

    The engine calls :meth:`accumulate` for every block of the quantity's columns, then
    :meth:`finish` once. Sinks of :attr:`Columns.HESSIAN` also get :meth:`add_terms`.
    """

    def accumulate(self, results: RuleResults, params: Params) -> None:
        """Add the contribution of one block of vectors for each of ``params``."""

    def finish(self, context: PassContext) -> Mapping[int, Any]:
        """Parameter id -> the value of this pass (what :meth:`~secorder_hooks.Quantity.combine` receives)."""

    def add_terms(self, terms: Mapping[int, Tensor], per_example: bool) -> None:
        """(:attr:`Columns.HESSIAN` only.) Add second-order diagonal terms, ``[N, *p]`` if ``per_example``."""


class BlockSums:
    """A sink whose value is one rule result per parameter, summed over the blocks.

    Args:
        reduce: ``(results, parts) -> value`` of one block for one parameter.
    """

    def __init__(self, reduce: Any) -> None:
        self.reduce = reduce
        self.values: dict[int, Tensor] = {}

    def accumulate(self, results: RuleResults, params: Params) -> None:
        """Add ``reduce(results, parts)`` for each parameter."""
        for key, parts in params:
            value = self.reduce(results, parts)
            self.values[key] = value if key not in self.values else self.values[key] + value

    def finish(self, context: PassContext) -> Mapping[int, Tensor]:
        """The sums (parameters no block reached are left out)."""
        return self.values


class _NoValues:
    """The sink of a quantity that does not define one: nothing is computed."""

    def accumulate(self, results: RuleResults, params: Params) -> None:
        """Ignore the block."""

    def finish(self, context: PassContext) -> Mapping[int, Any]:
        """No values."""
        return {}


_GENERATION = [0]
"""Incremented whenever a :class:`Quantity` subclass is defined or deleted."""
_SUBCLASS_REFS: set[weakref.ref[type]] = set()
"""Weak references to every subclass, whose callbacks count deletions."""


def subclass_generation() -> int:
    """A number that changes whenever a :class:`Quantity` subclass is defined or garbage-collected.

    Lets a cache of something computed from ``Quantity``'s subclasses (their attribute names)
    know when to recompute it.
    """
    return _GENERATION[0]


def _bump_generation() -> None:
    _GENERATION[0] += 1


def _subclass_deleted(
    ref: weakref.ref[type], refs: set[weakref.ref[type]] = _SUBCLASS_REFS, generation: list[int] = _GENERATION
) -> None:
    # bound as defaults: the callback may run while the interpreter tears this module down
    refs.discard(ref)
    generation[0] += 1


class Quantity:
    """Base class of the quantities; subclasses are small frozen dataclasses.

    A new quantity sets :attr:`attribute`, :attr:`order`, :attr:`accumulation` and
    :attr:`shard_scaling`, says what it needs (:attr:`needs`) and makes its per-pass
    :class:`~secorder_hooks.quantities.Sink` (:meth:`sink`); see :doc:`/engine` for a worked example.

    Attributes:
        attribute: Name of the attribute written to each trainable parameter.
        order: Which backward passes the quantity needs.
        accumulation: How the values of successive backward passes combine.
        shard_scaling: How the value of one pass combines over shards of its batch;
            ``None`` for a quantity that does not declare it, which then cannot be
            synchronized across processes (the engine raises instead of guessing).
    """

    attribute: ClassVar[str]
    order: ClassVar[Order]
    accumulation: ClassVar[Accumulation] = Accumulation.SUM
    shard_scaling: ClassVar[ShardScaling | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Count the new subclass, and its deletion, in :func:`subclass_generation`."""
        super().__init_subclass__(**kwargs)
        _bump_generation()
        _SUBCLASS_REFS.add(weakref.ref(cls, _subclass_deleted))

    @property
    def needs(self) -> Needs:
        """What the quantity needs; by default the gradient (order ``FIRST``) or the exact columns."""
        return Needs(Columns.GRADIENT if self.order is Order.FIRST else Columns.EXACT)

    def sink(self) -> Sink:
        """A new sink for one backward pass; by default one that computes nothing."""
        return _NoValues()

    def summed_shape(self, p: torch.Tensor) -> torch.Size:
        """Shape of the value of one pass for parameter ``p`` when it is a sum (``p.shape``).

        Used for a parameter that one process's shard does not reach while another's
        does, so that every process contributes the same buffer layout.
        """
        return p.shape

    def combine(self, old: Any, new: Any, before: int, added: int, name: str) -> Any:
        """The value over two accumulation windows (:attr:`Accumulation.SUM` and :attr:`~Accumulation.CONCATENATE`).

        Args:
            old: The attached value of the earlier passes (``None`` if none).
            new: The value of this pass (``None`` if it did not reach the parameter).
            before: Examples of the earlier passes.
            added: Examples of this pass.
            name: The parameter's name, for errors.

        Returns:
            The combined value, or ``None`` for none.
        """
        if self.accumulation is Accumulation.SUM:
            if old is None:
                return new
            return old if new is None else old + new
        if self.accumulation is Accumulation.CONCATENATE:
            return _concatenate(old, new, before, added)
        raise ExtensionError(
            f"{type(self).__name__} declares accumulation {self.accumulation}, which its class does not combine; "
            "override Quantity.combine."
        )

    def attach(self, p: Tensor, value: Any) -> None:
        """Write ``value`` to parameter ``p`` (``None``: remove the attribute)."""
        if value is None:
            if hasattr(p, self.attribute):
                delattr(p, self.attribute)
        else:
            setattr(p, self.attribute, value)

    def missing_rule(self, method: RuleMethod, module_name: str, module: nn.Module) -> str:
        """The error message for a module whose rule lacks ``method``, one of its ``needs.rule_methods``."""
        return (
            f"{type(self).__name__}: module '{module_name}' ({type(module).__name__}) has trainable parameters but "
            f"its rule does not implement {method.value}. Register a rule that does, or freeze them with "
            "requires_grad_(False)."
        )


def _concatenate(old: Tensor | None, new: Tensor | None, before: int, added: int) -> Tensor | None:
    """Rows of the earlier examples (zeros if none were kept), then this pass's (zeros if not reached)."""
    like = new if new is not None else old
    if like is None:
        return None
    if old is None and before > 0:
        old = like.new_zeros(before, *like.shape[1:])
    if new is None:
        new = like.new_zeros(added, *like.shape[1:])
    return new if old is None else torch.cat([old, new])
