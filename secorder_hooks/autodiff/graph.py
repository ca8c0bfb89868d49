"""Traversals of the autograd graph."""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor
from torch.autograd.graph import Node
from torch.utils.checkpoint import CheckpointFunction

__all__ = [
    "iter_nodes",
    "leaf_variable",
    "reached_parameters",
    "children",
    "only_input",
    "saved_int",
    "reentrant_checkpoint",
    "REENTRANT_CHECKPOINT_ADVICE",
]

REENTRANT_CHECKPOINT_ADVICE = (
    "A reentrant checkpoint recomputes its block inside its own backward and refuses any further "
    "backward pass through it (torch.autograd.grad), which the engine needs here. Pass "
    "use_reentrant=False to torch.utils.checkpoint.checkpoint (the same memory savings; every quantity is then "
    "exact)."
)


def children(node: Node) -> Iterator[Node]:
    """The nodes ``node`` passes gradients to (its differentiable inputs)."""
    for child, _ in node.next_functions:
        if child is not None:
            yield child


def only_input(node: Node) -> int | None:
    """The position in ``next_functions`` of the node's one differentiable input, ``None`` unless it has one."""
    inputs = [i for i, (child, _) in enumerate(node.next_functions) if child is not None]
    return inputs[0] if len(inputs) == 1 else None


def iter_nodes(root: Node | None, stop: set[Node] | None = None) -> Iterator[Node]:
    """Every node reachable from ``root`` (each once), not descending below ``stop``."""
    if root is None:
        return
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        if stop is not None and node in stop:
            continue
        for child in children(node):
            if child not in seen:
                seen.add(child)
                stack.append(child)


def leaf_variable(node: Node) -> Tensor | None:
    """The leaf tensor of an ``AccumulateGrad`` node, else ``None``."""
    return getattr(node, "variable", None)


def reached_parameters(root: Node | None, parameter_ids: set[int]) -> list[Tensor]:
    """The tensors among ``parameter_ids`` whose gradient a backward from ``root`` accumulates."""
    found = []
    for node in iter_nodes(root):
        var = leaf_variable(node)
        if var is not None and id(var) in parameter_ids:
            found.append(var)
    return found


def reentrant_checkpoint(root: Node | None) -> Node | None:
    """A node of ``torch.utils.checkpoint.checkpoint(..., use_reentrant=True)`` below ``root``, if any."""
    for node in iter_nodes(root):
        if getattr(node, "_forward_cls", None) is CheckpointFunction:
            return node
    return None


def saved_int(node: Node, name: str) -> int | tuple[int, ...]:
    """An integer attribute (or tuple of them) an autograd node saved, e.g. ``saved_int(node, "_saved_dim")``.

    Nodes expose negative integers (``dim=-1``, ``x[-2:]``) as unsigned 64-bit values;
    this gives them back their sign.
    """
    value = getattr(node, name)
    if isinstance(value, (tuple, list)):
        return tuple(_signed(v) for v in value)
    return _signed(value)


def _signed(value: int) -> int:
    value = int(value)
    return value - 2**64 if value >= 2**63 else value
