r"""Module calls whose inputs do not carry the batch on dim 0.

A transformer's position embedding is called on position ids ``[1, T]`` (Hugging Face
GPT-2, BERT) or ``[T]`` (nanoGPT) and its output ``[1, T, D]`` or ``[T, D]`` is
broadcast over the ``N`` examples afterwards, e.g. ``tokens + positions``. The
gradient autograd delivers at that output is summed over the examples by the broadcast,
so the call's per-example quantities must come from before the sum.

While the forward pass runs, the engine knows the number of examples ``N`` (dim 0 of the
model's first tensor input, :func:`root_batch_size`). The output of a call with a
different number of rows is *watched*: when it enters a broadcasting elementwise
operation (:data:`BROADCASTING`) together with a tensor of ``N`` rows, it is replaced by
its expansion to ``N`` rows (the same values: the operation would broadcast it anyway)
and the record is rebound to the expanded tensor, whose gradient ``[N, ...]`` row ``n``
is example ``n``'s. The call itself is then presented to its rule as *one* row (a batch
of one, :class:`Replica`), with the ``N`` examples folded into the rule's vector axis:

.. math::
    g^{(v)}_n = \partial \big(u_{vn}^\top \mathrm{out}(\theta)\big) / \partial \theta,

for the vectors :math:`u_{vn}` at row ``n`` of the expanded output. This is exact as
long as the expanded tensor is the only way the output reaches the loss; the backward
pass checks that (:func:`check_batch_axes`) and raises
:class:`~secorder_hooks.UnsupportedModuleError` naming the module and its input shapes
for every call whose rows are not the examples and that could not be expanded (an
output used some other way first, a call on a slice of the batch).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.utils._pytree import tree_flatten, tree_map

from secorder_hooks.autodiff.graph import iter_nodes
from secorder_hooks.engine.records import CallRecord, RecordStore
from secorder_hooks.errors import UnsupportedModuleError
from secorder_hooks.rules.base import LayerRule, ParamDict, weighted_square_reduce
from secorder_hooks.rules.inputs import CallInputs
from secorder_hooks.rules.layout import BatchLayout, batch_layout_for, example_count

__all__ = [
    "BROADCASTING",
    "Replica",
    "Watched",
    "check_batch_axes",
    "expand_watched",
    "replica_rule_call",
    "replica_own_term",
    "root_batch_size",
    "watch",
]

BROADCASTING: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.add, Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__,
        torch.sub, Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__,
        torch.mul, Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__,
        torch.div, Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__itruediv__,
        torch.where, torch.addcmul, Tensor.addcmul, torch.maximum, torch.minimum,
        Tensor.expand, Tensor.expand_as, torch.broadcast_to,
    }
)  # fmt: skip
"""Operations that broadcast their tensor arguments elementwise against each other (or to a
given shape): a watched argument may be replaced by its expansion without changing the result."""

_EXPANSIONS = (Tensor.expand, Tensor.expand_as, torch.broadcast_to)
_IN_PLACE = frozenset(
    {Tensor.add_, Tensor.__iadd__, Tensor.sub_, Tensor.__isub__, Tensor.mul_, Tensor.__imul__, Tensor.div_}
    | {Tensor.__itruediv__}
)


@dataclass(frozen=True)
class Replica:
    """A call that computed one row shared by all ``N`` examples.

    Attributes:
        examples: ``N``.
        inputs: The call's inputs as a batch of one (tensors unsqueezed at dim 0 where the
            call had no batch axis at all).
        row_shape: Shape of the call's output as a batch of one, ``[1, *out]``.
        nodes: The autograd nodes of the expansion (between the output and the expanded tensor).
    """

    examples: int
    inputs: CallInputs
    row_shape: torch.Size
    nodes: frozenset


@dataclass
class Watched:
    """A one-output call's output, noted by id: its record and, once broadcast, its expansion to ``N`` rows."""

    record: CallRecord
    expanded: Tensor | None = None

    def holds(self, x: Tensor) -> bool:
        """Whether ``x`` is the call's output (ids of freed tensors are reused; the record keeps its node alive)."""
        rec = self.record
        if rec.original_edge is not None:
            node, nr = rec.original_edge
        elif rec.output_edges:
            node, nr = rec.output_edges[0].node, rec.output_edges[0].output_nr
        else:
            return False
        return x.grad_fn is node and x.output_nr == nr


def root_batch_size(model: nn.Module, args: tuple, kwargs: dict) -> int | None:
    """``N``: dim 0 of the first tensor argument of the model call, ``None`` if unknown.

    Unknown for models with a layout of their own (a recurrent or attention module as
    the model, whose examples may sit on dim 1) and for calls without tensor arguments.
    """
    if type(batch_layout_for(model)).output_axes is not BatchLayout.output_axes:
        return None
    if args and isinstance(args[0], Tensor):  # the first leaf, without flattening the call
        return args[0].shape[0] if args[0].dim() > 0 else None
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, Tensor):
            return leaf.shape[0] if leaf.dim() > 0 else None
    return None


def watch(watched: dict[int, Watched], rec: CallRecord, output: object) -> None:
    """Note the output of a one-output call of a forward pass with a known batch, for :func:`expand_watched`."""
    if rec.batch_size is None or len(rec.output_shapes) != 1:
        return
    tensor = output if isinstance(output, Tensor) else tree_flatten(output)[0][rec.inputs.differentiable_outputs[0]]
    if tensor.grad_fn is not None:
        watched[id(tensor)] = Watched(rec)


def expand_watched(
    watched: dict[int, Watched], records: RecordStore, func: Callable[..., Any], args: tuple, kwargs: dict
) -> tuple[tuple, dict]:
    """``args``/``kwargs`` with recorded outputs that ``func`` broadcasts over the examples expanded to ``N`` rows.

    An output is expanded where the operation's result has the ``N`` examples on dim 0
    while the output has fewer dims (a call without batch axis) or one row (a call on
    one row shared by all examples). ``func`` is one of :data:`BROADCASTING`.
    """
    hits = [
        (i, entry)
        for i, x in (*enumerate(args), *kwargs.items())
        if isinstance(x, Tensor) and (entry := watched.get(id(x))) is not None and entry.holds(x)
    ]
    if not hits:
        return args, kwargs
    if func in _EXPANSIONS:
        target = _expansion_shape(func, args, kwargs)
    else:
        try:
            target = torch.broadcast_shapes(*(x.shape for x in (*args, *kwargs.values()) if isinstance(x, Tensor)))
        except RuntimeError:
            return args, kwargs
    if target is None or len(target) == 0:
        return args, kwargs
    args, kwargs = list(args), dict(kwargs)
    for i, entry in hits:
        x = args[i] if isinstance(i, int) else kwargs[i]
        n = entry.record.batch_size
        if target[0] != n or (i == 0 and func in _IN_PLACE):
            continue
        if not (x.dim() < len(target) or (x.shape[0] == 1 and n > 1)):
            continue
        expanded = _expand(records, entry, x, len(target))
        if expanded is None:
            continue
        if isinstance(i, int):
            args[i] = expanded
        else:
            kwargs[i] = expanded
    return tuple(args), kwargs


def _expansion_shape(func: Callable[..., Any], args: tuple, kwargs: dict) -> torch.Size | None:
    if func is Tensor.expand_as:
        other = args[1] if len(args) > 1 else kwargs.get("other")
        return other.shape if isinstance(other, Tensor) else None
    size = args[1:] if func is Tensor.expand else args[1:2]
    size = kwargs.get("size", size)
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = size[0]
    tensor = args[0]
    shape = list(size)
    offset = len(shape) - tensor.dim()
    if offset < 0 or not all(isinstance(s, int) for s in shape):
        return None
    return torch.Size(tensor.shape[i - offset] if s == -1 and i >= offset else s for i, s in enumerate(shape))


def _expand(records: RecordStore, entry: Watched, tensor: Tensor, dims: int) -> Tensor | None:
    """The expansion of a recorded output to ``[N, ...]`` with ``dims`` dims, rebinding its record once."""
    rec = entry.record
    n = rec.batch_size
    if entry.expanded is not None:
        return entry.expanded if entry.expanded.dim() == dims else None
    batch_free = tensor.dim() < dims
    inputs = rec.inputs
    if batch_free:
        inputs = _unsqueezed(rec)
        if inputs is None:
            return None
    with torch._C.DisableTorchFunction():
        row = tensor.reshape((1,) * (dims - tensor.dim()) + tuple(tensor.shape)) if batch_free else tensor
        expanded = row.expand(n, *row.shape[1:])
    entry.expanded = expanded
    row_shape = torch.Size((1, *tensor.shape)) if batch_free else tensor.shape
    nodes = {expanded.grad_fn}
    if row is not tensor:
        nodes.add(row.grad_fn)
    records.rebind(rec, expanded, Replica(n, inputs, row_shape, frozenset(nodes)))
    return expanded


def _unsqueezed(rec: CallRecord) -> CallInputs | None:
    """The call's inputs with a batch axis of one added, if the module computes the same row on them.

    Checked by calling the module again (without gradients): only built-in layers are
    known to treat a missing batch axis as a batch of one.
    """

    def add_axis(x: Any) -> Any:
        return x.detach().unsqueeze(0) if isinstance(x, Tensor) else x

    args = tree_map(add_axis, tuple(rec.inputs))
    kwargs = tree_map(add_axis, dict(rec.inputs.kwargs))
    if type(batch_layout_for(rec.module)).output_axes is not BatchLayout.output_axes:
        return None
    try:
        with torch.no_grad():
            out = rec.module(*args, **kwargs)
    except Exception:
        return None
    flat = tree_flatten(out)[0]
    index = rec.inputs.differentiable_outputs[0]
    if index >= len(flat) or not isinstance(flat[index], Tensor):
        return None
    row = flat[index]
    if row.shape != (1, *rec.output_shapes[0]):
        return None
    return CallInputs(args, kwargs, rec.inputs.differentiable_outputs)


def _rows(rec: CallRecord) -> int | None:
    """Rows of a record along its module's example axis (``None`` for 0-dim outputs)."""
    if any(len(s) == 0 for s in rec.output_shapes):
        return None
    layout = type(batch_layout_for(rec.module))
    default = layout.example_count is BatchLayout.example_count and layout.output_axes is BatchLayout.output_axes
    if default and rec.output_shapes and rec.inputs.differentiable_outputs:
        return rec.output_shapes[0][0]  # the default layout (most modules): dim 0 of the first output
    try:
        return example_count(rec.module, rec.inputs, rec.output_shapes)
    except (UnsupportedModuleError, IndexError):
        return None


# ----------------------------------------------------------------------------- rules on replicas
def _fold(replica: Replica, g: Tensor) -> Tensor:
    """``[V, N, *E]`` vectors at the expanded output as ``[V * N, *row_shape]``: one row, ``V * N`` vectors."""
    return g.reshape(g.shape[0] * g.shape[1], *replica.row_shape)


def replica_rule_call(
    rule: LayerRule,
    method: str,
    rec: CallRecord,
    g: Tensor,
    weights: Tensor | None,
    per_example: bool,
) -> ParamDict:
    """A rule method (as :class:`~secorder_hooks.engine.assemble.ColumnResults` calls it) on a replicated call.

    Args:
        rule: The module's rule.
        method: ``"per_example_grads"``, ``"squared_norms"`` or ``"weighted_squared_sum"``.
        rec: The record (``rec.replica`` set).
        g: ``[V, N, *E]`` vectors at the expanded output.
        weights: ``[V, N]`` or ``None``.
        per_example: For the weighted squared sum.

    Returns:
        What the method returns for an ordinary call of ``N`` examples.
    """
    replica = rec.replica
    assert replica is not None
    v, n = g.shape[:2]
    grads = rule.per_example_grads(rec.module, replica.inputs, _fold(replica, g))
    grads = {name: t.reshape(v, n, *t.shape[2:]) for name, t in grads.items()}  # [V*N, 1, *p] -> [V, N, *p]
    if method == "per_example_grads":
        return grads
    if method == "squared_norms":
        return {name: t.flatten(2).square().sum(-1) for name, t in grads.items()}
    return {name: weighted_square_reduce(t, weights, per_example) for name, t in grads.items()}


def replica_own_term(rule: LayerRule, rec: CallRecord, g: Tensor, per_example: bool) -> ParamDict:
    """``own_hessian_term`` of a replicated call for the output gradient ``g`` ``[N, *E]``."""
    replica = rec.replica
    assert replica is not None
    if not per_example:
        return rule.own_hessian_term(rec.module, replica.inputs, g.sum(0).reshape(replica.row_shape), False)
    rows = [rule.own_hessian_term(rec.module, replica.inputs, g_n.reshape(replica.row_shape), False) for g_n in g]
    return {name: torch.stack([r[name] for r in rows]) for name in rows[0]} if rows else {}


# ----------------------------------------------------------------------------- the check
def check_batch_axes(loss: Tensor, records: Sequence[CallRecord]) -> None:
    """Raise for a reached call whose rows are not the examples and that was not made exact.

    Args:
        loss: The tensor being differentiated.
        records: The calls the ordinary backward pass reached.

    Raises:
        UnsupportedModuleError: Naming the module and its input shapes.
    """
    replicas = {}
    for rec in records:
        if rec.batch_size is None:
            continue
        if rec.replica is not None:
            replicas[rec.original_edge] = rec
            continue
        rows = _rows(rec)
        if _unbatched(rec):
            raise UnsupportedModuleError(
                f"{type(rec.module).__name__} '{rec.name}' was called on an input of shape "
                f"{tuple(rec.inputs[0].shape)} without a batch axis, so the model input has none either: dim 0 "
                "must index the examples. For a single example pass x.unsqueeze(0) (a batch of one)."
            )
        if rows != rec.batch_size:
            raise UnsupportedModuleError(_message(rec, rows))
    if not replicas:
        return
    expansions = set().union(*(rec.replica.nodes for rec in replicas.values()))
    for node in iter_nodes(loss.grad_fn):
        if node in expansions:
            continue
        for child, nr in node.next_functions:
            rec = replicas.get((child, nr)) if child is not None else None
            if rec is not None:
                raise UnsupportedModuleError(
                    _message(rec, rec.replica.row_shape[0])
                    + f" Its output also reaches the loss through {type(node).__name__}, not only broadcast over the "
                    "examples: use it only in broadcasting operations (e.g. `x + out`) or expand it to the batch "
                    "first (`out.expand(N, ...)`)."
                )


def _unbatched(rec: CallRecord) -> bool:
    """A layer called without a batch axis (rows taken for examples): Linear on 1-D input, an unbatched conv."""
    x = rec.inputs[0] if rec.inputs and isinstance(rec.inputs[0], Tensor) else None
    if x is None:
        return False
    if isinstance(rec.module, nn.Linear):
        return x.dim() == 1
    if isinstance(rec.module, _ConvNd):
        return x.dim() == len(rec.module.kernel_size) + 1
    return False


def _message(rec: CallRecord, rows: int | None) -> str:
    shapes = [tuple(x.shape) for x in tree_flatten((tuple(rec.inputs), rec.inputs.kwargs))[0] if isinstance(x, Tensor)]
    return (
        f"{type(rec.module).__name__} '{rec.name}' was called with inputs of shapes {shapes} and returned "
        f"{tuple(rec.output_shapes[0]) if rec.output_shapes else ()}: its {rows} rows are not the {rec.batch_size} "
        "examples of the batch (dim 0 of the model's input). Per-example quantities need dim 0 to index the "
        "examples in every call, or an output that is broadcast over the examples in an elementwise operation "
        "(e.g. a position embedding added to the token embeddings). Pass inputs with the batch on dim 0 "
        "(x.unsqueeze(0) for a single example), and call modules on the whole batch, not a slice of it."
    )
