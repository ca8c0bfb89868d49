r"""The function API under data-parallel training: results of the global batch.

Every result of the function API is a sum over examples scaled by the reduction factor
(:math:`c \sum_n \dots`, a :class:`~secorder_hooks.quantities.ShardScaling` with
``c_power=1``). With a process group (``sync``, resolved as :func:`secorder_hooks.extend`
does), each process computes the result of its shard with the unwrapped model and
:class:`~secorder_hooks.engine.sync.Shards` all-reduces it with the weights
:math:`c / c_r` in one flattened all-reduce, so every process returns the result of the
concatenated batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import Tensor, nn

from secorder_hooks.engine.sync import Shards, Slot, SyncOption, ddp_of, scaled_loss_call, sync_group
from secorder_hooks.errors import ExtensionError
from secorder_hooks.losses.base import LossCall
from secorder_hooks.losses.recognition import record_loss_calls
from secorder_hooks.quantities import ShardScaling

__all__ = ["WatchedLoss", "synchronized", "sync_results", "unwrap"]

LossFn = Callable[[Tensor, Tensor], Tensor]
R = TypeVar("R", list[Tensor], Tensor)

_RESULT = ShardScaling(1)


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` wraps, or ``model`` itself."""
    return model.module if ddp_of(model) is not None else model


class WatchedLoss:
    """``loss_fn`` that keeps the recognized loss call behind the last loss it returned.

    Args:
        loss_fn: The user's ``loss_fn(outputs, targets)``.
        caller: Name of the public function, for error messages.
    """

    def __init__(self, loss_fn: LossFn, caller: str) -> None:
        self.loss_fn, self.caller = loss_fn, caller
        self.call: LossCall | None = None
        self.examples = 0

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``loss_fn(outputs, targets)``, keeping its loss call."""
        with record_loss_calls() as calls:
            loss = self.loss_fn(outputs, targets)
        if isinstance(loss, Tensor) and loss.requires_grad:
            self.call = scaled_loss_call(loss, calls, self.caller)
            self.examples = targets.shape[0]
        return loss


def sync_results(result: R, call: LossCall, examples: int, group: object) -> R:
    r"""The result of the global batch: :math:`\sum_r (c / c_r)` times each process's result.

    Args:
        result: A tensor or a list of tensors of this process's shard.
        call: The loss call of the shard (its reduction and number of averaged terms).
        examples: Examples of the shard.
        group: The process group.
    """
    tensors = [result] if isinstance(result, Tensor) else list(result)
    shards = Shards.start(group, call, examples, tensors[0].device)
    reduced = shards.all_reduce([Slot(t, t.shape, shards.weight(_RESULT), t.dtype) for t in tensors])
    return reduced[0] if isinstance(result, Tensor) else reduced


def synchronized(
    caller: str,
    model: nn.Module,
    loss_fn: LossFn,
    sync: SyncOption,
    compute: Callable[[nn.Module, LossFn], R],
    create_graph: bool = False,
) -> R:
    """``compute(unwrapped model, loss_fn)``, synchronized over the group ``sync`` resolves to.

    Raises:
        ExtensionError: Synchronizing a differentiable result (``create_graph=True``), or a
            loss that is not a constant multiple of one recognized loss call.
    """
    group = sync_group(model, sync, caller)
    inner = unwrap(model)
    if group is None:
        return compute(inner, loss_fn)
    if create_graph:
        raise ExtensionError(f"{caller}: create_graph=True cannot be synchronized across processes; pass sync=False.")
    watched = WatchedLoss(loss_fn, caller)
    result = compute(inner, watched)
    if watched.call is None:
        raise ExtensionError(f"{caller}: loss_fn returned no loss with a graph, so there is nothing to synchronize.")
    return sync_results(result, watched.call, watched.examples, group)
