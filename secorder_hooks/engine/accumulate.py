r"""Accumulation of the quantities over backward passes, exactly as ``.grad`` accumulates.

Every quantity the engine computes goes through here: a backward pass puts its own
values in a :class:`PassValues` (one pass, ``c_b`` of its loss), and :class:`Window`
combines them with those of the earlier passes that ``.grad`` still holds, by each
quantity's :class:`~secorder_hooks.quantities.Accumulation`:

* sums over examples add up (``sum_grad_squared``, ``diag_ggn_exact``, ``diag_ggn_mc``,
  ``diag_h``, and any quantity declaring :attr:`Accumulation.SUM`);
* per-example ones are concatenated along dim 0 (``grad_batch``, ``batch_l2``,
  ``*_batch``); a parameter a pass does not reach gets zero rows for its examples, as its
  gradient is zero there;
* ``variance`` is recomputed over all examples from the running sum of squares, the
  number of examples and ``.grad`` (the running sum of the per-example gradients).

So ``k`` micro-batches give the quantities of one batch of their concatenation, each
example's term scaled by the reduction factor of its own micro-batch.

When a window starts, per parameter, at the beginning of a backward pass inside
:func:`~secorder_hooks.extend`:

* ``.grad`` is ``None`` or all zeros (``zero_grad()`` with or without ``set_to_none``):
  a new window starts, and quantities of earlier windows are removed;
* ``.grad`` is the tensor the last backward pass inside ``extend()`` left, unchanged: the
  window continues;
* otherwise (a backward pass outside the context, or ``.grad`` changed in place) the
  quantities cannot match ``.grad``, and :class:`~secorder_hooks.ExtensionError` is raised.

With ``extend(..., accumulate=False)`` every backward pass starts a new window.
"""

from __future__ import annotations

import enum
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from secorder_hooks.engine.session import Session
from secorder_hooks.errors import ExtensionError
from secorder_hooks.quantities import Accumulation, Quantity
from secorder_hooks.quantities.base import subclass_generation

__all__ = ["PassValues", "Window", "WINDOW_ATTRIBUTE", "clear_quantities", "quantity_attributes"]

WINDOW_ATTRIBUTE = "_secorder_hooks_window"
"""Attribute of a parameter holding its :class:`_ParamWindow`."""


_ATTRIBUTES_CACHE: list[tuple[int, frozenset[str]]] = []
"""``(subclass_generation(), attribute names)`` of the last walk of the subclasses."""


def quantity_attributes() -> frozenset[str]:
    """The attribute names of every :class:`~secorder_hooks.quantities.Quantity` subclass defined so far.

    Walks the subclasses again only when one was defined or deleted since the last call
    (:func:`~secorder_hooks.quantities.base.subclass_generation`); a subclass's ``attribute``
    is a class constant, read when the walk runs.
    """
    generation = subclass_generation()
    if _ATTRIBUTES_CACHE and _ATTRIBUTES_CACHE[0][0] == generation:
        return _ATTRIBUTES_CACHE[0][1]
    names, todo = set(), list(Quantity.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if isinstance(getattr(cls, "attribute", None), str):
            names.add(cls.attribute)
    _ATTRIBUTES_CACHE[:] = [(generation, frozenset(names))]
    return _ATTRIBUTES_CACHE[0][1]


def clear_quantities(parameters: nn.Module | Iterable[Tensor]) -> None:
    """Remove every quantity attribute (``grad_batch``, ``diag_h``, ...) from the parameters.

    Also forgets what they accumulated. ``.grad`` itself is not touched: reset it too
    (``zero_grad()``) before the next backward pass inside :func:`~secorder_hooks.extend`,
    which otherwise raises because the quantities could not match ``.grad``.

    Example:
        >>> import torch
        >>> from secorder_hooks import extend, clear_quantities, SumGradSquared
        >>> model = torch.nn.Linear(3, 2)
        >>> with extend(model, SumGradSquared()):
        ...     model(torch.randn(4, 3)).square().sum().backward()
        >>> clear_quantities(model)
        >>> hasattr(model.weight, "sum_grad_squared")
        False

    Args:
        parameters: A module (all its parameters) or an iterable of parameters.
    """
    params = parameters.parameters() if isinstance(parameters, nn.Module) else parameters
    attributes = (*quantity_attributes(), WINDOW_ATTRIBUTE)
    for p in params:
        for attribute in attributes:
            if attribute in p.__dict__:
                delattr(p, attribute)


@dataclass
class _ParamWindow:
    r"""What the quantities on one parameter describe, as left by the last backward pass.

    Attributes:
        grad: Weak reference to the ``.grad`` tensor the pass left (``None`` if none).
        version: Its version counter then (in-place changes move it).
        attributes: The quantity attributes the window tracks.
        examples: Number of examples of the window's passes.
        square_sum: Running :math:`\sum_n g_n^2` (kept for ``Variance``), else ``None``.
    """

    grad: weakref.ref | None
    version: int
    attributes: frozenset[str]
    examples: int
    square_sum: Tensor | None

    def holds(self, grad: Tensor | None) -> bool:
        """Whether ``grad`` is what the pass left (the same tensor, unchanged, or still ``None``)."""
        if self.grad is None:
            return grad is None
        return grad is not None and self.grad() is grad and grad._version == self.version


class PassValues:
    r"""The quantities of one backward pass, before they are combined with earlier passes.

    Values are ``p.shape`` for :attr:`~Accumulation.SUM`, ``[N, ...]`` for
    :attr:`~Accumulation.CONCATENATE`, and :math:`\sum_n g_n^2` (``p.shape``) of this
    pass for :attr:`~Accumulation.VARIANCE`. Sums over examples (``SUM`` and
    ``VARIANCE`` values, :attr:`examples`) add up across passes, and so across processes
    that each ran a part of the batch.

    Attributes:
        values: Parameter id -> quantity type -> value of this pass.
        examples: Number of examples ``N`` of this pass (``0`` until set): the rows of
            its per-example values.
        summed_examples: Number of examples the sums run over when they are those of more
            examples than this process's rows (synchronized across processes), else ``None``.
    """

    def __init__(self) -> None:
        self.values: dict[int, dict[type[Quantity], Tensor]] = {}
        self.examples = 0
        self.summed_examples: int | None = None

    def put(self, key: int, quantity: type[Quantity], value: Tensor) -> None:
        """Set the value of ``quantity`` for parameter ``key`` in this pass."""
        self.values.setdefault(key, {})[quantity] = value


class _Status(enum.Enum):
    NEW = "new"
    CONTINUED = "continued"


class Window:
    """Which parameters continue their accumulation window in one backward pass.

    Built by :meth:`open` before the ordinary backward (it must see ``.grad`` as the
    user left it); :meth:`commit` then writes the combined quantities.

    Args:
        session: The active session.
        status: Parameter id -> new or continued window.
        examples: Parameter id -> examples of the window before this pass.
    """

    def __init__(self, session: Session, status: dict[int, _Status], examples: dict[int, int]) -> None:
        self.session = session
        self.status = status
        self.examples = examples

    @classmethod
    def open(cls, session: Session) -> Window:
        """Decide, per parameter of ``session``, whether its window continues.

        Raises:
            ExtensionError: ``.grad`` holds something other than what the last backward
                pass inside ``extend()`` left and is not zero; or it continues a window
                that did not compute one of the requested quantities.
        """
        params = session.params
        if not session.options.accumulate:
            return cls(session, {key: _Status.NEW for key in params}, {key: 0 for key in params})
        states = {key: p.__dict__.get(WINDOW_ATTRIBUTE) for key, p in params.items()}
        held = {key for key, state in states.items() if state is not None and state.holds(params[key].grad)}
        unknown = [key for key, p in params.items() if key not in held and p.grad is not None]
        foreign = [key for key, zero in zip(unknown, _all_zero([params[k].grad for k in unknown])) if not zero]
        if foreign:
            name = session.param_names[foreign[0]]
            raise ExtensionError(
                f"parameter '{name}': .grad holds a gradient that no backward pass inside extend() computed (a "
                "backward pass outside the context, or .grad changed in place), so the accumulated quantities "
                "could not match it. Call model.zero_grad() (or optimizer.zero_grad()) before the backward pass "
                "to start a new accumulation, or pass extend(..., accumulate=False) to compute the quantities of "
                "each backward pass alone."
            )
        # A parameter left without .grad continues only if the others continue: .grad is None both after
        # a pass that did not reach it and after zero_grad().
        continued = {k for k in held if params[k].grad is not None}
        if continued:
            continued |= {k for k in held if params[k].grad is None}
        requested = {q.attribute for q in session.quantities}
        for key in continued:
            missing = requested - states[key].attributes
            if missing:
                raise ExtensionError(
                    f"parameter '{session.param_names[key]}': .grad accumulates earlier backward passes that did not "
                    f"compute {sorted(missing)}, so {'it' if len(missing) == 1 else 'they'} could not match .grad. "
                    "Call model.zero_grad() first, or request the same quantities in every backward pass of an "
                    "accumulation."
                )
        before = max((states[k].examples for k in continued), default=0)
        status = {key: _Status.CONTINUED if key in continued else _Status.NEW for key in params}
        examples = {key: states[key].examples if key in continued else before for key in params}
        return cls(session, status, examples)

    def continued(self) -> list[int]:
        """The parameters whose window this pass continues."""
        return [key for key, status in self.status.items() if status is _Status.CONTINUED]

    def commit(self, values: PassValues, grads: dict[int, Tensor]) -> None:
        """Combine this pass's ``values`` with the window's and write them to the parameters.

        Args:
            values: The quantities of this pass.
            grads: Parameter id -> sum over the window's examples of the per-example
                gradients (``.grad``, or this pass's gradient with ``accumulate=False``),
                needed for ``Variance`` only.
        """
        session = self.session
        requested = {q.attribute for q in session.quantities}
        stale = quantity_attributes() - requested if session.options.accumulate else frozenset()
        for key, p in session.params.items():
            continued = self.status[key] is _Status.CONTINUED
            state = p.__dict__.get(WINDOW_ATTRIBUTE) if continued else None
            if key not in values.values and not continued and p.grad is None:
                _forget(p, requested | stale)
                continue
            new = values.values.get(key, {})
            before = self.examples[key]
            total = before + values.examples
            square_sum = None
            for q in session.quantities:
                old = getattr(p, q.attribute, None) if continued else None
                value = new.get(type(q))
                if q.accumulation is Accumulation.VARIANCE:  # from the window's running sums and .grad
                    square_sum = _add(state.square_sum if state is not None else None, value)
                    n = total if values.summed_examples is None else before + values.summed_examples
                    result = None if square_sum is None else _variance(square_sum, grads.get(key), n)
                else:
                    result = q.combine(old, value, before, values.examples, session.param_names[key])
                q.attach(p, result)
            _forget(p, stale)
            if not session.options.accumulate:
                continue  # the quantities describe this pass alone, .grad perhaps more
            grad = p.grad
            setattr(
                p,
                WINDOW_ATTRIBUTE,
                _ParamWindow(
                    weakref.ref(grad) if grad is not None else None,
                    grad._version if grad is not None else 0,
                    frozenset(requested),
                    total,
                    square_sum,
                ),
            )

    def abandon(self) -> None:
        """Remove the quantities of the session's parameters: an error left them inconsistent with ``.grad``."""
        clear_quantities(self.session.params.values())


def _forget(p: Tensor, attributes: Iterable[str]) -> None:
    for attribute in (*attributes, WINDOW_ATTRIBUTE):
        if attribute in p.__dict__:
            delattr(p, attribute)


def _all_zero(grads: list[Tensor]) -> list[bool]:
    """Whether each tensor is all zeros, with one host synchronization per device."""
    by_device: dict[torch.device, list[int]] = {}
    for i, g in enumerate(grads):
        by_device.setdefault(g.device, []).append(i)
    result = [False] * len(grads)
    for indices in by_device.values():
        nonzero = torch.stack([grads[i].any() for i in indices]).tolist()
        for i, flag in zip(indices, nonzero):
            result[i] = not flag
    return result


def _add(old: Tensor | None, new: Tensor | None) -> Tensor | None:
    if old is None:
        return new
    return old if new is None else old + new


def _variance(square_sum: Tensor, grad: Tensor | None, n: int) -> Tensor:
    r""":math:`\frac1N \sum_n g_n^2 - (\frac1N \sum_n g_n)^2 = (\sum_n g_n^2 - g^2 / N) / N`, clamped at 0."""
    if grad is None:
        return (square_sum / n).clamp_(min=0)
    return torch.addcmul(square_sum, grad, grad, value=-1.0 / n).div_(n).clamp_(min=0)
