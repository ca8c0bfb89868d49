r"""Synchronizing quantities across the processes of data-parallel training.

Each process computes its quantities from its shard :math:`r` of the global batch, with
its own reduction factor :math:`c_r`. :class:`Shards` all-reduces the shard's counts
(averaged terms :math:`D_r`, examples :math:`N_r`) and then every summed tensor, weighted
by :math:`w_r` of :class:`~secorder_hooks.quantities.ShardScaling`, so that each process
holds the tensor of the concatenated batch; rows of per-example tensors stay on their
process and are only reweighted. Communication: one all-reduce of two numbers, launched
before the ordinary backward pass and overlapped with it, and one flattened all-reduce
of every summed tensor (per dtype and device) once they are all computed; with Kronecker
quantities, a small all-reduce of the factors' shapes before it (:func:`_kronecker_slots`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Union

import torch
from torch import Tensor, nn

from secorder_hooks.errors import ExtensionError
from secorder_hooks.losses.calls import LossCall, averaged_terms
from secorder_hooks.quantities import Accumulation, KroneckerFactors, Quantity, ShardScaling

if torch.distributed.is_available():
    from torch.distributed import ProcessGroup
    from torch.nn.parallel import DistributedDataParallel
else:  # builds without torch.distributed: nothing can be synchronized
    ProcessGroup = object
    DistributedDataParallel = None

if TYPE_CHECKING:
    from secorder_hooks.engine.accumulate import PassValues
    from secorder_hooks.engine.session import Session

__all__ = ["SyncOption", "Shards", "Slot", "synchronize", "ddp_of", "sync_group", "scaled_loss_call"]

SyncOption = Union[bool, ProcessGroup, None]
"""``None``: synchronize if the model is a ``DistributedDataParallel`` (over its group);
``True``: synchronize over the model's DDP group, else the default group; ``False``: never;
a process group: synchronize over it."""

_GRADIENT = ShardScaling(1)
_MEAN_FACTOR = ShardScaling(0, 1)
"""The input factor :math:`A` of a Kronecker quantity, a mean over the examples (no :math:`c`)."""
_MAX_FACTOR_DIMS = 3
"""A Kronecker factor is ``[d]`` (a diagonal), ``[d, d]`` or ``[G, d, d]`` (per group)."""
_FLAG = torch.Size([1])
_CONSTANT_FACTORS = frozenset({"MulBackward0", "DivBackward0"})


def ddp_of(model: nn.Module) -> nn.Module | None:
    """``model`` if it is a ``torch.nn.parallel.DistributedDataParallel``, else ``None``."""
    if DistributedDataParallel is None:
        return None
    return model if isinstance(model, DistributedDataParallel) else None


def sync_group(model: nn.Module, sync: SyncOption, caller: str = "extend()") -> ProcessGroup | None:
    """The process group to synchronize over, ``None`` for no synchronization.

    Raises:
        ExtensionError: Synchronization is requested but ``torch.distributed`` is not initialized.
        TypeError: ``sync`` is not a bool, ``None`` or a process group.
    """
    if sync is False:
        return None
    ddp = ddp_of(model)
    if sync is None:
        return None if ddp is None else ddp.process_group
    if sync is True:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise ExtensionError(
                f"{caller} got sync=True, but torch.distributed is not initialized. Call "
                "torch.distributed.init_process_group() first (torchrun sets up its environment), or pass sync=False."
            )
        return ddp.process_group if ddp is not None else torch.distributed.group.WORLD
    if torch.distributed.is_available() and isinstance(sync, torch.distributed.ProcessGroup):
        return sync
    raise TypeError(f"{caller}: sync must be None, True, False or a torch.distributed ProcessGroup, got {sync!r}.")


def scaled_loss_call(
    loss: Tensor, calls: Sequence[LossCall] | Callable[[object], LossCall | None], caller: str = "sync"
) -> LossCall:
    """The recognized loss call of which ``loss`` is a constant multiple (``ce``, ``ce / k``, ``0.5 * ce``).

    The constant must be the same in every process (e.g. one over the number of
    accumulation steps); only then do the processes' losses add up to the loss of the
    concatenated batch with the weights of :class:`~secorder_hooks.quantities.ShardScaling`.

    Raises:
        ExtensionError: ``loss`` is anything else, so its reduction over the global batch is unknown.
    """
    find = calls if callable(calls) else _finder(calls)
    node = loss.grad_fn
    while node is not None:
        call = find(node)
        if call is not None:
            return call
        nexts = [fn for fn, _ in node.next_functions if fn is not None]
        name = type(node).__name__
        if name not in _CONSTANT_FACTORS or len(nexts) != 1 or node.next_functions[0][0] is None:
            break
        node = nexts[0]
    raise ExtensionError(
        f"{caller}: synchronizing across processes needs the reduction of the loss over the global batch, so the "
        "loss must be the result of one recognized loss function (F.cross_entropy, F.nll_loss, F.mse_loss, "
        "F.binary_cross_entropy_with_logits or their nn modules), possibly multiplied or divided by a constant "
        "that is the same in every process; this loss is not. Compute it so, or pass sync=False."
    )


def _finder(calls: Sequence[LossCall]) -> Callable[[object], LossCall | None]:
    def find(node: object) -> LossCall | None:
        return next((call for call in calls if call.result is not None and call.result.grad_fn is node), None)

    return find


@dataclass
class Shards:
    """This process's shard of the global batch, and the counts of the whole batch.

    Attributes:
        group: The process group.
        mean: Whether the loss is a mean (else a sum) over its terms.
        local_terms: :math:`D_r`, the averaged terms of this shard (``1/c_r`` for a mean).
        local_examples: :math:`N_r`.
    """

    group: ProcessGroup
    mean: bool
    local_terms: float
    local_examples: int
    _counts: Tensor
    _work: object | None
    _global: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def start(cls, group: ProcessGroup, call: LossCall, examples: int, device: torch.device) -> Shards:
        """Launch the all-reduce of the counts (asynchronous; waited for on first use).

        Raises:
            ExtensionError: ``reduction="none"``, or a mean over no terms (every target ignored).
        """
        try:
            mean = call.reduction.value == "mean"
        except NotImplementedError as err:  # reduction="none" (an UnsupportedLossOptionError)
            raise ExtensionError(f"synchronizing needs a scalar loss; {err}") from err
        terms = averaged_terms(call)
        if terms == 0:
            raise ExtensionError(
                "this process's shard has no terms in its mean loss (every target is ignored), so its loss and "
                "quantities are NaN; give every process a target that counts, or use reduction='sum'."
            )
        counts = torch.tensor([terms, float(examples)], dtype=torch.float64, device=device)
        work = torch.distributed.all_reduce(counts, group=group, async_op=True)
        return cls(group, mean, terms, examples, counts, work)

    def _totals(self) -> tuple[float, float]:
        """:math:`(D, N)` of the global batch (waits for the all-reduce once)."""
        if self._work is not None:
            self._work.wait()
            self._work = None
            self._global = (float(self._counts[0]), float(self._counts[1]))
        return self._global

    @property
    def device(self) -> torch.device:
        """The device of the all-reduced buffers."""
        return self._counts.device

    @property
    def examples(self) -> int:
        """:math:`N`, the examples of the global batch."""
        return round(self._totals()[1])

    def weight(self, scaling: ShardScaling) -> float:
        r""":math:`w_r = (c / c_r)^k (N_r / N)^m` of this shard."""
        terms, examples = self._totals()
        ratio_c = self.local_terms / terms if self.mean else 1.0
        return ratio_c**scaling.c_power * (self.local_examples / examples) ** scaling.example_power

    def rows(self, tensor: Tensor, scaling: ShardScaling) -> Tensor:
        """This shard's rows of the global batch's per-example tensor.

        In place where ``tensor`` is contiguous and outside autograd (a fresh result of the
        engine's: per-example tensors are memory bound, a copy would cost as much again).
        """
        w = self.weight(scaling)
        if w == 1.0:
            return tensor
        if tensor.is_contiguous() and not tensor.requires_grad:
            return tensor.mul_(w)
        return tensor * w

    def all_reduce(self, slots: Sequence[Slot]) -> list[Tensor]:
        r"""``sum_r weight_r * value_r`` of every slot, in one flattened all-reduce per dtype.

        Every process must pass the same shapes and dtypes in the same order.

        Returns:
            Views of the reduced buffers, shaped like the slots.
        """
        device = self.device
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, slot in enumerate(slots):
            by_dtype.setdefault(slot.dtype, []).append(i)
        out: list[Tensor] = [None] * len(slots)  # type: ignore[list-item]
        for dtype, indices in sorted(by_dtype.items(), key=lambda item: str(item[0])):
            sizes = [slots[i].shape.numel() for i in indices]
            bucket = torch.empty(sum(sizes), dtype=dtype, device=device)
            start = 0
            for i, size in zip(indices, sizes):
                slot, piece = slots[i], bucket[start : start + size]
                if not isinstance(slot.value, Tensor):
                    piece.fill_(slot.value * slot.weight)
                elif slot.weight == 1.0:
                    piece.copy_(slot.value.detach().reshape(-1))
                else:
                    torch.mul(slot.value.detach().reshape(-1), slot.weight, out=piece)
                out[i] = piece.view(slot.shape)
                start += size
            torch.distributed.all_reduce(bucket, group=self.group)
        return out


@dataclass(frozen=True)
class Slot:
    """One tensor of the flattened all-reduce.

    Attributes:
        value: This process's tensor, or a number filling the slot (0 for a tensor this
            process does not have).
        shape: Shape of the slot (the tensor's).
        weight: This process's weight :math:`w_r`.
        dtype: Dtype of the slot.
    """

    value: Tensor | float
    shape: torch.Size
    weight: float
    dtype: torch.dtype


def synchronize(session: Session, shards: Shards, values: PassValues, grads: dict[int, Tensor]) -> dict[int, Tensor]:
    r"""Make ``values`` (one pass of this process) the values of the pass's global batch, in place.

    Sums over examples (:attr:`~secorder_hooks.Accumulation.SUM` and the sum of
    squares of ``VARIANCE``) are all-reduced with the weights :math:`w_r`, in one flattened
    buffer together with the gradients ``grads`` of the pass (when ``Variance`` is
    requested) and a presence flag per parameter and quantity; per-example rows are
    reweighted where they are (and stay this process's ``values.examples`` rows); each
    Kronecker factor is all-reduced with its own weight (:func:`_kronecker_slots`);
    ``values.summed_examples`` becomes :math:`N`.

    The layout depends on the session's parameters and quantities only, so it is the same
    in every process: zeros where this process's shard did not reach a parameter.

    Returns:
        The gradients of the pass of the global batch (``c / c_r``-weighted sums), for ``Variance``.

    Raises:
        ExtensionError: A requested quantity does not declare its ``shard_scaling`` (:class:`~secorder_hooks.EKFAC`).
    """
    for q in session.quantities:
        if q.accumulation is Accumulation.KRONECKER and q.shard_scaling is None:
            raise ExtensionError(
                f"{type(q).__name__} cannot be synchronized across processes: its eigenbases are those of the "
                "global batch's Kronecker factors, which exist only after an all-reduce, and its corrected "
                "diagonal must then be recomputed in those bases. Pass sync=False (each process gets its shard's "
                "EK-FAC), or synchronize KFLR() and form the eigenbases from its factors."
            )
        if q.shard_scaling is None:
            raise ExtensionError(
                f"{type(q).__name__} does not declare how it combines across processes (Quantity.shard_scaling), so "
                "it cannot be synchronized; pass sync=False to compute it per process."
            )
    kronecker = [q for q in session.quantities if q.accumulation is Accumulation.KRONECKER]
    summed = [q for q in session.quantities if q.accumulation not in (Accumulation.CONCATENATE, Accumulation.KRONECKER)]
    rows = [q for q in session.quantities if q.accumulation is Accumulation.CONCATENATE]
    wants_grads = any(q.accumulation is Accumulation.VARIANCE for q in session.quantities)
    reweighted: dict[int, Tensor] = {}  # a tensor that is the value of several quantities is reweighted once
    for per_quantity in values.values.values():
        for q in rows:
            t = per_quantity.get(type(q))
            if t is not None:
                if id(t) not in reweighted:
                    reweighted[id(t)] = shards.rows(t, q.shard_scaling)
                per_quantity[type(q)] = reweighted[id(t)]
    slots: list[Slot] = []
    layout: list[tuple[int, type, int, int]] = []  # (parameter, quantity type or None for the gradient, slot, flag)
    factor_layout = _kronecker_slots(session, shards, values, kronecker, slots)
    for key, p in session.params.items():
        for q in summed:
            value = values.values.get(key, {}).get(type(q))
            shape = torch.Size(q.summed_shape(p))
            if value is not None and value.shape != shape:
                raise ExtensionError(
                    f"{type(q).__name__}.summed_shape gives {tuple(shape)} for parameter '{session.param_names[key]}', "
                    f"computed: {tuple(value.shape)}; the layout must be known in every process. Fix summed_shape."
                )
            slots.append(Slot(0.0 if value is None else value, shape, shards.weight(q.shard_scaling), p.dtype))
            slots.append(Slot(0.0 if value is None else 1.0, _FLAG, 1.0, p.dtype))
            layout.append((key, type(q), len(slots) - 2, len(slots) - 1))
        if wants_grads:
            grad = grads.get(key)
            slots.append(Slot(0.0 if grad is None else grad, p.shape, shards.weight(_GRADIENT), p.dtype))
            slots.append(Slot(0.0 if grad is None else 1.0, _FLAG, 1.0, p.dtype))
            layout.append((key, None, len(slots) - 2, len(slots) - 1))
    values.summed_examples = shards.examples
    if not slots:
        return {}
    reduced = shards.all_reduce(slots)
    for key, quantity, factor_slots, mean_index, flag in factor_layout:
        if float(reduced[flag]) > 0:  # some process reached the parameter
            factors = KroneckerFactors([reduced[i] for i in factor_slots], mean_index)
            values.values.setdefault(key, {})[quantity] = factors
    reached = torch.cat([reduced[flag] for *_, flag in layout]).tolist() if layout else []
    global_grads: dict[int, Tensor] = {}
    for (key, quantity, slot, _), count in zip(layout, reached):
        if count == 0:  # no process reached the parameter
            continue
        if quantity is None:
            global_grads[key] = reduced[slot]
        else:
            values.values.setdefault(key, {})[quantity] = reduced[slot]
    return global_grads


FactorLayout = list[tuple[int, type, list[int], Union[int, None], int]]
"""``(parameter, quantity type, slot of each factor, position of the mean factor, presence flag slot)``."""


def _kronecker_slots(
    session: Session, shards: Shards, values: PassValues, quantities: Sequence[Quantity], slots: list[Slot]
) -> FactorLayout:
    r"""Append the slots of the Kronecker factors of ``quantities`` to ``slots``; their layout.

    Each factor is all-reduced with its own weight: the output factor :math:`B` and a
    fallback diagonal (sums over examples, carrying :math:`c`) with the quantity's
    ``shard_scaling``, the input factor :math:`A` (a mean over the :math:`N_r` examples) with
    :math:`w_r = N_r / N`, so that every process gets the factors of the concatenated batch.
    The factors' shapes depend on the layer and are known only where a shard reached it:
    one small all-reduce (maximum) of the shapes first gives every process the same layout.
    """
    if not quantities:
        return []
    keys = [(key, q) for key in session.params for q in quantities]
    width = 2 + 2 * (1 + _MAX_FACTOR_DIMS)  # count, mean index + 1, then (ndim, *shape) per factor
    rows = [[0] * width for _ in keys]
    for row, (key, q) in zip(rows, keys):
        factors = values.values.get(key, {}).get(type(q))
        if factors is None:
            continue
        if len(factors) > 2 or any(f.dim() > _MAX_FACTOR_DIMS for f in factors):
            raise ExtensionError(
                f"{type(q).__name__}: parameter '{session.param_names[key]}' has {len(factors)} factors of dims "
                f"{[f.dim() for f in factors]}; only one or two factors of at most {_MAX_FACTOR_DIMS} dims can be "
                "synchronized. Pass sync=False."
            )
        mean_index = getattr(factors, "mean_index", None)
        row[0], row[1] = len(factors), 0 if mean_index is None else mean_index + 1
        for i, f in enumerate(factors):
            start = 2 + i * (1 + _MAX_FACTOR_DIMS)
            row[start : start + 1 + f.dim()] = [f.dim(), *f.shape]
    shapes = torch.tensor(rows, dtype=torch.int64, device=shards.device)
    torch.distributed.all_reduce(shapes, op=torch.distributed.ReduceOp.MAX, group=shards.group)
    layout: FactorLayout = []
    for (key, q), row in zip(keys, shapes.tolist()):
        count = row[0]
        if count == 0:  # no process reached the parameter
            continue
        mean_index = row[1] - 1 if row[1] > 0 else None
        factors = values.values.get(key, {}).get(type(q))
        dtype = session.params[key].dtype
        factor_slots = []
        for i in range(count):
            start = 2 + i * (1 + _MAX_FACTOR_DIMS)
            shape = torch.Size(row[start + 1 : start + 1 + row[start]])
            scaling = _MEAN_FACTOR if i == mean_index else q.shard_scaling
            slots.append(Slot(0.0 if factors is None else factors[i], shape, shards.weight(scaling), dtype))
            factor_slots.append(len(slots) - 1)
        slots.append(Slot(0.0 if factors is None else 1.0, _FLAG, 1.0, dtype))
        layout.append((key, type(q), factor_slots, mean_index, len(slots) - 1))
    return layout
