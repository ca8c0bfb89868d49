"""What a layer rule receives of a module call: :class:`CallInputs`.

The engine records each call of a parameter-owning module (:mod:`secorder_hooks.engine.records`)
and hands the rules its inputs in this form.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["CallInputs"]


class CallInputs(tuple):
    """The positional arguments of a module call, as a tuple, with the rest of the call.

    Rules index it like the ``args`` tuple of a forward hook (``inputs[0]`` is the first
    positional argument). The generic rule also reads:

    Attributes:
        kwargs: Keyword arguments of the call.
        differentiable_outputs: Positions, in ``torch.utils._pytree.tree_flatten(output)``,
            of the tensor outputs the engine backpropagates to (those requiring grad).
        effective: For a module with reparametrized tensors, the value of each (name ->
            tensor, with its autograd graph from the originals) that the call used
            (:mod:`secorder_hooks.rules.reparametrized`); ``None`` otherwise.
    """

    kwargs: dict
    differentiable_outputs: tuple[int, ...]
    effective: dict[str, Tensor] | None

    def __new__(  # noqa: D102
        cls,
        args: tuple,
        kwargs: dict,
        differentiable_outputs: tuple[int, ...],
        effective: dict[str, Tensor] | None = None,
    ) -> CallInputs:
        obj = super().__new__(cls, args)
        obj.kwargs = kwargs
        obj.differentiable_outputs = differentiable_outputs
        obj.effective = effective
        return obj
