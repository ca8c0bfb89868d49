r"""The layer-rule interface and its registry.

A *rule* turns what the engine recorded for one call of a module, its inputs and a
batch of vectors backpropagated to its output, into quantities of the module's own
parameters. Shapes used throughout:

* ``inputs``: the positional arguments of the call (a tuple, like the ``args`` of a
  forward hook), tensors with dim 0 indexing the ``N`` examples.
* ``grad_output``: ``[V, N, *out]``, ``V`` vectors backpropagated to the module output
  (``V = 1`` for the gradient of the loss; ``V`` loss-Hessian square-root columns for
  curvature).
* ``weights``: optional ``[V, N]`` signs or weights of the vectors (``None`` means 1).

Writing :math:`g^{(v)}_n = \partial (v^\top \mathrm{out}) / \partial \theta` restricted to
example ``n``, a rule must give the per-example gradients
:math:`g^{(v)}_n` and may override the reductions of them that have cheaper closed forms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar, Union

import torch
from einops import rearrange, repeat
from torch import Tensor, nn

from secorder_hooks.quantities import RuleMethod, WeightSharing

__all__ = [
    "LayerRule",
    "FunctionRule",
    "register_rule",
    "registered_rule",
    "trainable_parameters",
    "rule_parameters",
    "implements",
    "square_sum",
    "squared_norms",
    "weighted_square_reduce",
]

ParamDict = dict[str, Tensor]


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters owned directly by ``module`` (not its children) that require grad.

    As ``module.named_parameters(recurse=False)`` (a parameter registered twice keeps its
    first name), read off ``module._parameters``: the engine asks for every module of the
    model at each ``extend()``, and the generator machinery cost more than the lookup.
    """
    own: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, p in module._parameters.items():
        if p is not None and p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            own[name] = p
    return own


def rule_parameters(rule: LayerRule, module: nn.Module) -> dict[str, nn.Parameter]:
    """The trainable parameters ``rule`` computes quantities of for ``module``, by name relative to it.

    ``rule.parameters(module)`` where the rule defines it (a
    :class:`~secorder_hooks.rules.generic.GenericRule` with ``children``), else the
    module's own trainable parameters.
    """
    covered = getattr(rule, "parameters", None)
    return covered(module) if callable(covered) else trainable_parameters(module)


def implements(rule: LayerRule, method: RuleMethod) -> bool:
    """Whether ``rule`` implements ``method``: the methods with defaults always, the Kronecker ones if overridden."""
    if method is RuleMethod.KRONECKER:
        return type(rule).kronecker_input is not LayerRule.kronecker_input
    return True


class LayerRule:
    """Computes per-example quantities of one module type from recorded tensors.

    Subclasses implement :meth:`per_example_grads`; the other methods have correct
    defaults built on it and exist so that a rule can avoid materializing
    ``[V, N, *p.shape]`` when a closed form is cheaper.
    """

    def per_example_grads(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        """Per-example gradients of each vector.

        Args:
            module: The module that was called.
            inputs: Positional tensor inputs of the call, ``[N, ...]`` each.
            grad_output: ``[V, N, *out]`` vectors at the module output.

        Returns:
            For every trainable parameter name, a tensor ``[V, N, *p.shape]``.
        """
        raise NotImplementedError

    def weighted_squared_sum(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        per_example: bool,
    ) -> ParamDict:
        r""":math:`\sum_v w_{vn} (g^{(v)}_n)^2`, summed over ``n`` unless ``per_example``.

        Returns:
            Per parameter name, ``p.shape`` or ``[N, *p.shape]`` if ``per_example``.
        """
        grads = self.per_example_grads(module, inputs, grad_output)
        return {name: weighted_square_reduce(g, weights, per_example) for name, g in grads.items()}

    def squared_norms(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        r""":math:`\|g^{(v)}_n\|^2` per parameter tensor, ``[V, N]`` per parameter name."""
        grads = self.per_example_grads(module, inputs, grad_output)
        return {name: squared_norms(g) for name, g in grads.items()}

    def output_curvature(
        self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor, per_example: bool
    ) -> ParamDict:
        r""":math:`\sum_{e} r_{ne} (\partial \mathrm{out}_{ne} / \partial\theta)^2` for output weights ``r``.

        This is the Hessian-diagonal contribution of an elementwise curved operation
        applied directly to the module output, with ``r = phi''(out) * dL/dphi``.

        Args:
            module: The module that was called.
            inputs: Positional tensor inputs of the call, ``[N, ...]`` each.
            output_weights: ``[N, *out]`` weight of every output element.
            per_example: Keep the example axis.

        Returns:
            Per parameter name, ``p.shape`` or ``[N, *p.shape]``.
        """
        n = output_weights.shape[0]
        flat = output_weights.reshape(n, -1)
        columns = torch.diag_embed(torch.ones_like(flat)).permute(2, 0, 1).reshape(-1, *output_weights.shape)
        return self.weighted_squared_sum(module, inputs, columns, rearrange(flat, "n e -> e n"), per_example)

    def own_hessian_term(
        self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor, per_example: bool
    ) -> ParamDict:
        r"""Diagonal of :math:`\nabla^2_\theta \sum_n g_n^\top \mathrm{out}_n(\theta)`, ``grad_output`` ``[N, *out]``.

        Zero for modules whose output is affine in their own parameters (all built-in
        rules), so the default returns an empty dict.
        """
        return {}

    def input_curvature(self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor) -> Tensor | None:
        r""":math:`\sum_e r_{ne} (\partial \mathrm{out}_{ne} / \partial x_{ni})^2` for the first input ``x``.

        The diagonal of :math:`J_x^\top \operatorname{diag}(r) J_x` per example, where
        :math:`J_x` is the Jacobian of the output with respect to the first input. The
        engine propagates Hessian terms of curved operations through the layer with it
        instead of backpropagating one column per output element.

        Args:
            module: The module that was called.
            inputs: Positional tensor inputs of the call.
            output_weights: ``[N, *out]`` weight of every output element.

        Returns:
            ``[N, *in]``, or ``None`` when the rule has no closed form (the default).
        """
        return None

    def input_vjp(self, module: nn.Module, inputs: Sequence[Tensor], vectors: Tensor) -> Tensor | None:
        r""":math:`J_x^\top v` for ``V`` vectors at the output, ``x`` the first input.

        Lets the engine backpropagate curvature columns through a chain of layers without
        autograd (:func:`~secorder_hooks.engine.columns.backprop_columns`); the result is
        not differentiable.

        Args:
            module: The module that was called.
            inputs: Positional tensor inputs of the call.
            vectors: ``[V, N, *out]``.

        Returns:
            ``[V, N, *in]``, or ``None`` when the rule has no closed form (the default).
        """
        return None

    kronecker_input_first: bool = False
    """Whether the weight's block is :math:`A \\otimes B` (rows of the weight index the input, as for
    ``nn.Embedding``) instead of :math:`B \\otimes A` (rows index the output, Linear and convolutions)."""

    def kronecker_input(
        self, module: nn.Module, inputs: Sequence[Tensor], sharing: WeightSharing, fold_bias: bool
    ) -> Tensor | None:
        r"""The input factor :math:`A` of the Kronecker quantities, ``[G, I', I']``.

        :math:`A = \frac{1}{N} \sum_n (\ldots)` is the second moment of the layer input
        :math:`a = x`, or :math:`a = (x, 1)` with ``fold_bias`` (the bias coordinate last; asked
        only of modules with a trainable ``bias``), a mean over the examples; how positions
        enter is set by ``sharing``
        (``secorder_hooks.rules.kronecker``). The engine gives a Kronecker block
        :math:`B \otimes A` to the module's ``weight`` (``[O, ...]``, flattened row-major,
        ``G`` groups of ``O / G`` rows) and ``B`` to its ``bias``.

        Returns:
            ``[G, I', I']``, or ``None`` for a module without a Kronecker rule (the default).
        """
        return None

    def kronecker_output(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        sharing: WeightSharing,
    ) -> Tensor:
        r"""The output factor :math:`B = \sum_{v,n} w_{vn} (\ldots)` of vectors ``[V, N, *out]``, ``[G, O/G, O/G]``.

        A sum over vectors and examples of the second moment of the vectors at the
        output (positions as ``sharing`` says). Only called where :meth:`kronecker_input`
        is not ``None``.
        """
        raise NotImplementedError(f"{type(self).__name__} has no Kronecker rule.")

    def touches_one_output(self, module: nn.Module, inputs: Sequence[Tensor]) -> bool:
        """Whether each parameter entry affects at most one output element per example.

        Then :meth:`output_curvature` with the diagonal of a propagated curvature matrix
        is exact. False by default.
        """
        return False


#: Up to this many vectors, :func:`square_sum` accumulates one vector at a time into a
#: buffer of one vector's size (in cache) instead of squaring all of them first: 0.07 against
#: 0.11 ms for 9 vectors ``[128, 512]`` on 2 cores.
ACCUMULATE_VECTORS = 16
#: ... unless all vectors together have at most this many elements: they are in cache anyway (and
#: below torch's parallel grain size), and two operations beat ``3 V`` small ones: 4 against 40 us
#: for 9 vectors ``[8, 64]`` (the benchmarks' small MLP).
BULK_ELEMENTS = 2**15


def square_sum(g: Tensor, weights: Tensor | None) -> Tensor:
    r""":math:`\sum_v w_{vn} g_{vn\ldots}^2` over the leading vector axis of ``g`` ``[V, N, ...]``.

    Args:
        g: ``[V, N, ...]``.
        weights: ``[V, N]`` or ``None`` (all ones).

    Returns:
        ``[N, ...]``, a new tensor.
    """
    v = g.shape[0]
    if weights is not None:
        weights = weights.reshape(*weights.shape, *([1] * (g.dim() - 2)))
    if v == 0 or v > ACCUMULATE_VECTORS or g.numel() <= BULK_ELEMENTS:
        squares = g.square()
        return (squares if weights is None else squares.mul_(weights)).sum(0)
    total = g[0].square()
    if weights is not None:
        total.mul_(weights[0])
    for i in range(1, v):
        total.addcmul_(g[i], g[i] if weights is None else g[i] * weights[i])
    return total


def squared_norms(grads: Tensor) -> Tensor:
    """``[V, N]``: the squared norm of each ``[V, N, *p]`` per-example gradient (``p`` may be a scalar)."""
    return grads.reshape(*grads.shape[:2], -1).square().sum(-1)


def weighted_square_reduce(grads: Tensor, weights: Tensor | None, per_example: bool) -> Tensor:
    r""":func:`square_sum` of ``[V, N, *p]``, summed over the examples too unless ``per_example``.

    Returns:
        ``[N, *p]`` if ``per_example``, else ``p``'s shape: :math:`\sum_{v,n} w_{vn} g_{vn}^2`.
    """
    squares = square_sum(grads, weights)
    return squares if per_example else squares.sum(0)


class FunctionRule(LayerRule):
    """Adapts a plain function ``fn(module, inputs, grad_output) -> {name: [N, *p]}``.

    The function sees ordinary ``[N, *out]`` output gradients; the ``V`` vectors of the
    engine are folded into the example axis (inputs are repeated ``V`` times).
    """

    def __init__(self, fn: Callable[[nn.Module, Sequence[Tensor], Tensor], ParamDict]) -> None:
        self.fn = fn

    def per_example_grads(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        """Per-example gradients of the ``V`` vectors, folded into the example axis for the function."""
        v, n = grad_output.shape[:2]
        folded_inputs = [repeat(x, "n ... -> (v n) ...", v=v) if isinstance(x, Tensor) else x for x in inputs]
        grads = self.fn(module, folded_inputs, grad_output.flatten(0, 1))
        return {name: g.reshape(v, n, *g.shape[1:]) for name, g in grads.items()}

    def __repr__(self) -> str:
        return f"FunctionRule({getattr(self.fn, '__qualname__', self.fn)!r})"


_RULES: dict[type[nn.Module], LayerRule] = {}

RuleLike = Union[LayerRule, type[LayerRule], Callable[..., ParamDict]]
R = TypeVar("R", bound=RuleLike)


def register_rule(module_class: type[nn.Module]) -> Callable[[R], R]:
    """Class decorator or function decorator registering a rule for ``module_class``.

    The rule applies to ``module_class`` and its subclasses unless a subclass has its own
    rule (lookup follows the MRO). Registering again for the same class overrides.

    Example:
        >>> import torch
        >>> from secorder_hooks import register_rule
        >>> class Scale(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(3))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> @register_rule(Scale)
        ... def scale_rule(module, inputs, grad_output):
        ...     return {"weight": grad_output * inputs[0]}

    Args:
        module_class: The module type the rule handles.

    Returns:
        A decorator that registers its argument and returns it unchanged. It accepts a
        :class:`LayerRule` subclass (instantiated without arguments), an instance, or a
        function ``fn(module, inputs, grad_output) -> {param_name: [N, *p.shape]}``.
    """
    if not (isinstance(module_class, type) and issubclass(module_class, nn.Module)):
        raise TypeError(f"register_rule expects an nn.Module subclass, got {module_class!r}.")

    def decorator(rule: R) -> R:
        if isinstance(rule, type) and issubclass(rule, LayerRule):
            _RULES[module_class] = rule()
        elif isinstance(rule, LayerRule):
            _RULES[module_class] = rule
        elif callable(rule):
            _RULES[module_class] = FunctionRule(rule)
        else:
            raise TypeError(f"register_rule({module_class.__name__}) got {rule!r}; expected a LayerRule or a function.")
        return rule

    return decorator


def registered_rule(module: nn.Module) -> LayerRule | None:
    """The rule registered for ``type(module)`` or its nearest base class, if any."""
    for cls in type(module).__mro__:
        if cls in _RULES:
            return _RULES[cls]
    return None
