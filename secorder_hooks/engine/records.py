"""What the engine records for each call of a parameter-owning module.

A :class:`CallRecord` keeps the call's positional tensor inputs, a gradient edge for
each tensor output (captured at call time, so it refers to the value *before* any
in-place operation on the output), and the output gradients captured in the ordinary
backward pass (by a pre-hook of the node that produced each output, so they are the
gradients autograd propagated, after any tensor hook of the user's). Records live in a
:class:`RecordStore` owned by one :func:`~secorder_hooks.extend` context and are dropped
after each backward pass.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.hooks import RemovableHandle

from secorder_hooks.rules.inputs import CallInputs

__all__ = ["CallRecord", "ForwardPass", "RecordStore", "GraphOwned"]

T = TypeVar("T")


class GraphOwned(Generic[T]):
    """Objects of a forward pass kept alive by its autograd graph, not by the session.

    :meth:`add` registers a pre-hook holding the object on a node of the graph and keeps
    only a weak reference: once the user drops every tensor of a forward pass that was
    never backpropagated (an evaluation forward with gradients enabled), the graph, its
    hooks and the objects are freed together (by the garbage collector when an object
    refers back to the graph). :meth:`clear` removes the hooks, so that no object outlives
    the context or the backward pass that consumed it.
    """

    def __init__(self) -> None:
        self._entries: dict[int, tuple[weakref.ref, RemovableHandle]] = {}

    def add(self, obj: T, node: Node) -> None:
        """Keep ``obj`` for as long as ``node`` (and so the graph of the forward pass) is alive."""
        key = id(obj)
        entries = self._entries
        handle = node.register_prehook(_holder(obj))
        entries[key] = (weakref.ref(obj, lambda _, key=key: entries.pop(key, None)), handle)

    def alive(self) -> list[T]:
        """The objects still alive, in the order they were added."""
        found = []
        for ref, _ in list(self._entries.values()):  # a garbage collection may free entries meanwhile
            obj = ref()
            if obj is not None:
                found.append(obj)
        return found

    def __iter__(self) -> Iterator[T]:
        return iter(self.alive())

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every object and remove the hooks holding them."""
        entries = list(self._entries.values())
        self._entries.clear()
        for _, handle in entries:  # removing a hook may free its object, whose callback edits the dict
            handle.remove()


def _holder(obj: object):
    def hook(grad_outputs: tuple) -> None:  # holds obj; does nothing
        del grad_outputs

    hook.obj = obj  # type: ignore[attr-defined]
    return hook


_RELEASED = CallInputs((), {}, ())
"""The inputs of a released record (shared: nothing modifies them)."""


@dataclass(eq=False)
class CallRecord:
    """One call of a module whose parameters the engine differentiates.

    Attributes:
        module: The called module.
        name: Qualified name of the module in the extended model.
        inputs: Positional arguments of the call (tensors ``[N, ...]``), with keyword
            arguments and output structure attached.
        output_edges: Gradient edge of each differentiable tensor output.
        output_shapes: Shape of each differentiable tensor output.
        output_kinds: Dtype and device of each differentiable tensor output.
        grads: Output gradients captured in the ordinary backward pass (``None`` where
            no gradient arrived).
        during_backward: The call ran inside a backward pass (the recomputation of a
            reentrant activation checkpoint).
        batch_size: The number of examples ``N`` of the forward pass the call belongs to,
            where known (dim 0 of the model's input).
        replica: Set when the call computed one row that is broadcast over the ``N``
            examples (``secorder_hooks.engine.broadcast``): its output edge, shape and
            gradients are then those of the expansion to ``N`` rows.
        original_edge: ``(node, output_nr)`` of the call's own output, once rebound to an expansion.
        binding: How often the outputs were rebound (the capture hooks of earlier bindings stay silent).
    """

    module: nn.Module
    name: str
    inputs: CallInputs
    output_edges: list[GradientEdge]
    output_shapes: list[torch.Size]
    output_kinds: list[tuple[torch.dtype, torch.device]]
    grads: list[Tensor | None] = field(default_factory=list)
    during_backward: bool = False
    batch_size: int | None = None
    replica: Any = None
    original_edge: tuple[Any, int] | None = None
    binding: int = 0

    def release(self) -> None:
        """Drop the recorded tensors (the output hooks may outlive the record)."""
        self.inputs = _RELEASED
        self.replica = self.original_edge = None
        self.output_edges, self.grads = [], [None] * len(self.grads)

    @property
    def reached(self) -> bool:
        """Whether the last ordinary backward pass reached any output of this call."""
        return any(g is not None for g in self.grads)

    def grad_output(self) -> Tensor | tuple[Tensor, ...]:
        """The captured output gradient(s) with a leading vector axis, ``[1, N, *out]``.

        Outputs that received no gradient get zeros.
        """
        if len(self.grads) == 1 and self.grads[0] is not None:
            return self.grads[0].unsqueeze(0)
        grads = tuple((self.zeros_like_output(i) if g is None else g).unsqueeze(0) for i, g in enumerate(self.grads))
        return grads[0] if len(grads) == 1 else grads

    def zeros_like_output(self, index: int, leading: tuple[int, ...] = ()) -> Tensor:
        """Zeros shaped ``[*leading, *out]`` like differentiable output ``index``."""
        dtype, device = self.output_kinds[index]
        return torch.zeros(*leading, *self.output_shapes[index], dtype=dtype, device=device)


@dataclass(eq=False)
class ForwardPass:
    """The records of one forward pass of the extended model and its output.

    Owned by the node of the output (:class:`GraphOwned`), so it lives as long as anything
    that could be backpropagated through that output (the output itself, a loss of it).

    Attributes:
        records: The calls recorded during the pass, in call order.
        output_edge: Gradient edge of the model output.
        output_shape: Its shape.
    """

    records: list[CallRecord]
    output_edge: GradientEdge
    output_shape: torch.Size


class RecordStore:
    """The calls recorded since the last backward pass.

    Calls recorded during a forward pass of the extended model are handed to a
    :class:`ForwardPass` owned by the graph of the model output (:meth:`seal`): a forward
    pass that is never backpropagated (an evaluation forward with gradients enabled) and
    whose tensors the user dropped leaves nothing behind. Calls outside such a pass (a
    submodule called directly) are kept until the next backward pass.

    Attributes:
        capturing: Output hooks store gradients only while this is set (during the
            ordinary backward pass, not during the engine's own column passes).
        paused: No calls are recorded while this is set (the generic rule re-runs modules).
    """

    def __init__(self) -> None:
        self._pending: list[CallRecord] = []
        self.passes: GraphOwned[ForwardPass] = GraphOwned()
        self._capturing = False
        self.paused = False

    @property
    def capturing(self) -> bool:
        """Whether output hooks store gradients; setting it starts a fresh capture.

        Turning it on forgets the gradients of an earlier backward pass through the same
        graph (``retain_graph=True``), so each pass yields its own quantities.
        """
        return self._capturing

    @capturing.setter
    def capturing(self, value: bool) -> None:
        if value and not self._capturing:
            for rec in self.all():
                rec.grads = [None] * len(rec.grads)
        self._capturing = value

    def all(self) -> list[CallRecord]:
        """The records of the live forward passes (in the order the passes were sealed), then the pending ones."""
        records = []
        for forward in self.passes.alive():
            records += forward.records
        records += self._pending
        return records

    def __iter__(self) -> Iterator[CallRecord]:
        return iter(self.all())

    def __len__(self) -> int:
        return len(self.all())

    def seal(self, output: Tensor) -> None:
        """End a forward pass of the model whose output is ``output`` (with a ``grad_fn``)."""
        edge = get_gradient_edge(output)
        forward = ForwardPass(self._pending, edge, output.shape)
        self._pending = []
        self.passes.add(forward, edge.node)

    @property
    def pending_count(self) -> int:
        """Records of the running forward pass (not yet sealed)."""
        return len(self._pending)

    @property
    def last(self) -> CallRecord:
        """The latest record of the running forward pass."""
        return self._pending[-1]

    def clear(self) -> None:
        """Drop every record, releasing the tensors it holds even if a hook still refers to it."""
        for rec in self.all():
            rec.release()
        self._pending = []
        self.passes.clear()

    def record(
        self,
        module: nn.Module,
        name: str,
        args: tuple,
        kwargs: dict,
        output: object,
        effective: dict[str, Tensor] | None = None,
        batch_size: int | None = None,
    ) -> object:
        """Record one call: called from the module's forward hook.

        ``effective`` holds the values of the module's reparametrized tensors in this call.

        Returns:
            The output to use instead, or ``None`` to keep it. A differentiable output
            that is a view is replaced by a copy: an in-place operation on a view rewrites
            the autograd history of its base, and the gradient of the value the module
            returned would no longer be reachable.
        """
        if type(output) is Tensor:  # the common case, without the pytree round trip
            if not output.requires_grad:
                return None
            replaced = output._is_view()
            if replaced:
                output = output.clone()
            flat, spec, indices, outputs = None, None, (0,), [output]
            edges = [get_gradient_edge(output)]
            shapes, kinds = [output.shape], [(output.dtype, output.device)]
        else:
            flat, spec = tree_flatten(output)
            indices = tuple(i for i, t in enumerate(flat) if isinstance(t, Tensor) and t.requires_grad)
            if not indices:
                return None
            replaced = False
            for i in indices:
                if flat[i]._is_view():
                    flat[i], replaced = flat[i].clone(), True
            outputs = [flat[i] for i in indices]
            edges = [get_gradient_edge(t) for t in outputs]
            shapes, kinds = [t.shape for t in outputs], [(t.dtype, t.device) for t in outputs]
        rec = CallRecord(
            module,
            name,
            CallInputs(args, kwargs, indices, effective),
            edges,
            shapes,
            kinds,
            [None] * len(outputs),
            self._capturing,
            batch_size,
        )
        ref = weakref.ref(rec)
        for i, edge in enumerate(edges):
            edge.node.register_prehook(self._capture(ref, i, edge.output_nr))
        self._pending.append(rec)
        if not replaced:
            return None
        return output if spec is None else tree_unflatten(flat, spec)

    def rebind(self, rec: CallRecord, expanded: Tensor, replica: Any) -> None:
        """Capture the gradients of a one-output call at ``expanded`` instead of its output.

        Args:
            rec: The record.
            expanded: The output expanded to ``N`` rows (a differentiable function of it).
            replica: The :class:`~secorder_hooks.engine.broadcast.Replica` describing the call.
        """
        edge = get_gradient_edge(expanded)
        rec.original_edge = (rec.output_edges[0].node, rec.output_edges[0].output_nr)
        rec.output_edges = [edge]
        rec.output_shapes = [expanded.shape]
        rec.replica = replica
        rec.binding += 1
        edge.node.register_prehook(self._capture(weakref.ref(rec), 0, edge.output_nr))

    def _capture(self, ref: weakref.ref[CallRecord], index: int, output_nr: int):
        binding = ref().binding  # not the edge: the closure would keep its node (and graph) alive

        # A pre-hook of the node that produced the output sees the gradient that node receives, after
        # every tensor hook (users' gradient hooks included); a tensor hook of ours would see only those
        # registered before it. Half the cost of a tensor hook, which builds a hook dict in Python. It
        # refers to the record weakly: the record is owned by its forward pass, not by its own node.
        def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
            grad = grad_outputs[output_nr]
            rec = ref()
            # the record may have been rebound to an expansion of the output since (broadcast.py)
            if self.capturing and grad is not None and rec is not None and rec.binding == binding:
                prev = rec.grads[index]
                rec.grads[index] = grad if prev is None else prev + grad

        return hook
