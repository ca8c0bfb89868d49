r"""Where the example axis of a module's calls is: :class:`BatchLayout` and its registry.

The default puts examples on dim 0 of every output and of every input tensor whose dim 0
has ``N`` entries; other inputs (a shared mask, a table) are passed unchanged to every
example. :class:`torch.nn.MultiheadAttention` and the recurrent modules, whose example
axis is 1 unless ``batch_first``, have layouts registered here. The engine reads the
number of examples of a call with :func:`example_count`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence
from torch.utils._pytree import tree_flatten, tree_unflatten

from secorder_hooks.errors import UnsupportedModuleError

__all__ = [
    "BatchLayout",
    "batch_layout_for",
    "example_count",
    "register_batch_layout",
    "call_kwargs",
    "output_indices",
]


class BatchLayout:
    """Where the example axis of one module type's calls is.

    The default: dim 0 of every differentiable output, and dim 0 of every input tensor
    (positional or keyword, nested in tuples/lists/dicts) whose dim 0 has ``N`` entries.

    Attributes:
        vectorize: Whether examples may be processed with :func:`torch.func.vmap`. Set it
            to ``False`` for modules whose operators lack batching rules (examples are then
            processed one by one, each as a batch of one).
    """

    vectorize: bool = True

    def output_axes(self, module: nn.Module, inputs: Sequence[Any]) -> tuple[int, ...]:
        """Example axis of each differentiable output (aligned with ``inputs.differentiable_outputs``)."""
        return (0,) * len(output_indices(inputs))

    def input_axes(self, module: nn.Module, inputs: Sequence[Any], n: int) -> tuple[tuple, dict]:
        """Example axis (int) or ``None`` (shared) for each positional and keyword argument.

        Each entry may be a prefix pytree (one axis for a whole tuple of tensors);
        non-tensor leaves are always shared.
        """

        def axis(x: Any) -> int | None:
            return 0 if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == n else None

        args = tuple(_map_leaves(axis, a) for a in inputs)
        return args, {k: _map_leaves(axis, v) for k, v in call_kwargs(inputs).items()}

    def example_count(self, module: nn.Module, inputs: Sequence[Any], output_shapes: Sequence[torch.Size]) -> int:
        """Number of examples ``N`` of a call whose differentiable outputs have ``output_shapes``."""
        return output_shapes[0][self.output_axes(module, inputs)[0]]


_LAYOUTS: dict[type[nn.Module], BatchLayout] = {}
_DEFAULT_LAYOUT = BatchLayout()
L = TypeVar("L", BatchLayout, type[BatchLayout])


def register_batch_layout(module_class: type[nn.Module]) -> Callable[[L], L]:
    """Decorator registering a :class:`BatchLayout` (class or instance) for ``module_class`` and subclasses."""

    def decorator(layout: L) -> L:
        _LAYOUTS[module_class] = layout() if isinstance(layout, type) else layout
        return layout

    return decorator


def batch_layout_for(module: nn.Module) -> BatchLayout:
    """The layout registered for ``type(module)`` or its nearest base class, else the default."""
    for cls in type(module).__mro__:
        if cls in _LAYOUTS:
            return _LAYOUTS[cls]
    return _DEFAULT_LAYOUT


def example_count(module: nn.Module, inputs: Sequence[Any], output_shapes: Sequence[torch.Size]) -> int:
    """Number of examples of a recorded call, read along the module's example axis."""
    return batch_layout_for(module).example_count(module, inputs, output_shapes)


def _axes_by_name(module: nn.Module, inputs: Sequence[Any], axes: dict[str, Any]) -> tuple[tuple, dict]:
    """Per-argument axes from a map ``forward`` parameter name -> axis (missing names are shared)."""
    names = list(inspect.signature(module.forward).parameters)
    args = tuple(axes.get(names[i]) if i < len(names) else None for i in range(len(inputs)))
    return args, {k: axes.get(k) for k in call_kwargs(inputs)}


def _argument(module: nn.Module, inputs: Sequence[Any], name: str) -> Any:
    names = list(inspect.signature(module.forward).parameters)
    position = names.index(name)
    return inputs[position] if position < len(inputs) else call_kwargs(inputs).get(name)


@register_batch_layout(nn.MultiheadAttention)
class MultiheadAttentionLayout(BatchLayout):
    """Query/key/value ``[L, N, E]`` (``[N, L, E]`` if ``batch_first``); weights ``[N, (H,) L, S]``."""

    def _sequence_axis(self, module: nn.Module, inputs: Sequence[Any]) -> int:
        query = _argument(module, inputs, "query")
        if query.dim() != 3:
            raise UnsupportedModuleError(
                f"{type(module).__name__} called with unbatched {query.dim()}-D query: per-example quantities "
                "need a batch axis. Pass [N, L, E] (batch_first=True) or [L, N, E]."
            )
        mask = _argument(module, inputs, "attn_mask")
        if isinstance(mask, Tensor) and mask.dim() == 3 and module.num_heads > 1:
            raise UnsupportedModuleError(
                f"{type(module).__name__} called with a 3-D attn_mask [N*num_heads, L, S]; the generic rule "
                "supports a shared 2-D attn_mask [L, S] or key_padding_mask [N, S]."
            )
        return 0 if module.batch_first else 1

    def output_axes(self, module: nn.Module, inputs: Sequence[Any]) -> tuple[int, ...]:
        seq = self._sequence_axis(module, inputs)
        return tuple(seq if i == 0 else 0 for i in output_indices(inputs))

    def input_axes(self, module: nn.Module, inputs: Sequence[Any], n: int) -> tuple[tuple, dict]:
        seq = self._sequence_axis(module, inputs)
        return _axes_by_name(module, inputs, {"query": seq, "key": seq, "value": seq, "key_padding_mask": 0})


@register_batch_layout(nn.RNNBase)
class RecurrentLayout(BatchLayout):
    """Input/output ``[T, N, *]`` (``[N, T, *]`` if ``batch_first``); hidden states ``[layers, N, H]``."""

    vectorize = False  # the fused recurrent operators have no vmap batching rule

    def _input_axis(self, module: nn.Module, inputs: Sequence[Any]) -> int:
        x = inputs[0] if inputs else call_kwargs(inputs).get("input")
        if isinstance(x, PackedSequence) or not isinstance(x, Tensor) or x.dim() != 3:
            raise UnsupportedModuleError(
                f"{type(module).__name__}: the generic rule needs a batched 3-D tensor input, got "
                f"{type(x).__name__}{'' if not isinstance(x, Tensor) else f' of dim {x.dim()}'}; pad the sequences "
                "instead of packing them."
            )
        return 0 if module.batch_first else 1

    def output_axes(self, module: nn.Module, inputs: Sequence[Any]) -> tuple[int, ...]:
        axis = self._input_axis(module, inputs)
        return tuple(axis if i == 0 else 1 for i in output_indices(inputs))

    def input_axes(self, module: nn.Module, inputs: Sequence[Any], n: int) -> tuple[tuple, dict]:
        return _axes_by_name(module, inputs, {"input": self._input_axis(module, inputs), "hx": 1})


@register_batch_layout(nn.PReLU)
class UnvectorizedLayout(BatchLayout):
    """Default layout, examples processed one by one.

    Nested ``vmap`` over ``prelu``'s backward returns wrong values or raises in
    torch 2.x (examples x vectors), so :class:`torch.nn.PReLU` is not vectorized.
    """

    vectorize = False


def call_kwargs(inputs: Sequence[Any]) -> dict:
    """The keyword arguments of a recorded call (``inputs.kwargs``), ``{}`` if none."""
    return getattr(inputs, "kwargs", None) or {}


def output_indices(inputs: Sequence[Any], count: int = 1) -> tuple[int, ...]:
    """Positions of the differentiable outputs of a recorded call (all ``count`` if not recorded)."""
    return tuple(getattr(inputs, "differentiable_outputs", range(count)))


def _map_leaves(fn: Callable[[Any], Any], tree: Any) -> Any:
    leaves, spec = tree_flatten(tree)
    return tree_unflatten([fn(x) for x in leaves], spec)
