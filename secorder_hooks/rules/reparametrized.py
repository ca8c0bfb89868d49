r"""Modules whose tensors are functions of other parameters: weight norm, spectral norm, orthogonal.

A *reparametrized* tensor of a module (its ``weight``, say) is not a parameter but a
function :math:`W = f(\theta)` of trainable *originals* :math:`\theta`, computed in the
forward pass. Two forms exist in PyTorch and are detected here:

* :mod:`torch.nn.utils.parametrize` (``torch.nn.utils.parametrizations.weight_norm``,
  ``spectral_norm``, ``orthogonal``, and any user parametrization): ``module.weight`` is a
  property evaluating ``module.parametrizations.weight``; the originals are the trainable
  parameters of that :class:`~torch.nn.utils.parametrize.ParametrizationList`
  (``parametrizations.weight.original0``, ..., and those of the parametrization modules).
* the deprecated forward pre-hooks ``torch.nn.utils.weight_norm`` (originals
  ``weight_g``, ``weight_v``) and ``torch.nn.utils.spectral_norm`` (``weight_orig``),
  which store :math:`W` as a plain attribute before each call.

:class:`ReparametrizedRule` wraps the module's own rule, which computes everything for
the *effective* tensor :math:`W` as if it were a parameter, with :math:`W` frozen at the
value the call used (:func:`frozen_tensors`: no recomputation, so spectral norm's power
iteration does not run again). The chain rule through :math:`f` is then generic: the
per-example gradients of the ``V`` vectors are mapped by :math:`J_f^\top` with one
vectorized backward through the autograd graph the forward pass built from
:math:`\theta` to :math:`W` (the function exactly as evaluated, e.g. with spectral norm's
power-iteration vectors held constant as autograd holds them). Every quantity built on
per-example gradients follows (their squares, norms, GGN / MC Fisher columns, the
Hessian's curvature columns); the Hessian adds the parametrization's own second
derivative

.. math::
    \operatorname{diag} \nabla^2_\theta \big(r^\top f(\theta)\big), \qquad
    r = \partial L / \partial W \ (\text{per example: } r_n),

by one-hot Hessian-vector products through that graph (:func:`graph_hessian_diagonal`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from secorder_hooks.autodiff.vjp import batched_grad
from secorder_hooks.errors import ExtensionError, UnsupportedModuleError
from secorder_hooks.rules.base import LayerRule, ParamDict, rule_parameters, squared_norms, weighted_square_reduce

__all__ = [
    "Form",
    "Reparametrization",
    "ReparametrizedRule",
    "reparametrizations",
    "parametrization_modules",
    "frozen_tensors",
    "effective_values",
    "graph_hessian_diagonal",
]

HESSIAN_CHUNK = 256
"""One-hot Hessian-vector products evaluated at once by :func:`graph_hessian_diagonal`."""

VECTOR_ELEMENTS = 2**24
"""Bound on the elements of the per-example gradients (``[v, N, *p]``, all parameters of the
module) materialized at once by the reductions of :class:`ReparametrizedRule`; at least one
vector's (``N`` gradients) is materialized, as for ``BatchGrad``."""

_HOOK_ORIGINALS: dict[type, tuple[str, ...]] = {WeightNorm: ("_g", "_v"), SpectralNorm: ("_orig",)}
"""Deprecated reparametrization pre-hooks and the suffixes of the originals they read."""


class Form(enum.Enum):
    """How a module's tensor is reparametrized."""

    PARAMETRIZE = "parametrize"
    """A property evaluating ``module.parametrizations[name]`` (``torch.nn.utils.parametrize``)."""
    HOOK = "hook"
    """An attribute set by a forward pre-hook (deprecated ``torch.nn.utils.weight_norm``)."""


@dataclass(frozen=True)
class Reparametrization:
    """One reparametrized tensor of a module.

    Attributes:
        name: The tensor's attribute name in the module (``"weight"``).
        originals: Names, relative to the module, of the trainable parameters it is
            computed from.
        form: Which mechanism computes it.
        hook_key: Key of the pre-hook in ``module._forward_pre_hooks`` (:attr:`Form.HOOK`).
    """

    name: str
    originals: tuple[str, ...]
    form: Form
    hook_key: int | None = None


def reparametrizations(module: nn.Module) -> tuple[Reparametrization, ...]:
    """The reparametrized tensors of ``module`` that depend on trainable parameters."""
    found = []
    if _is_parametrized(module):
        for name, plist in module.parametrizations.items():
            originals = tuple(f"parametrizations.{name}.{k}" for k, p in plist.named_parameters() if p.requires_grad)
            if originals:
                found.append(Reparametrization(name, originals, Form.PARAMETRIZE))
    for key, hook in module._forward_pre_hooks.items():
        suffixes = _HOOK_ORIGINALS.get(type(hook))
        if suffixes is None:
            continue
        originals = tuple(
            hook.name + s
            for s in suffixes
            if (p := module._parameters.get(hook.name + s)) is not None and p.requires_grad
        )
        if originals:
            found.append(Reparametrization(hook.name, originals, Form.HOOK, key))
    return tuple(found)


def parametrization_modules(modules: Iterable[nn.Module]) -> set[nn.Module]:
    """Every :class:`~torch.nn.utils.parametrize.ParametrizationList` of ``modules`` and the modules inside it.

    Their parameters are originals of the module they parametrize, whose rule covers them.

    Args:
        modules: Every module of the model (``model.modules()``; a list the caller walks again
            saves a second walk of the module tree).
    """
    inside: set[nn.Module] = set()
    for module in modules:
        if _is_parametrized(module):
            for plist in module.parametrizations.values():
                inside.update(plist.modules())
    return inside


def _is_parametrized(module: nn.Module) -> bool:
    """``parametrize.is_parametrized`` by a dict lookup first (called for every module at each ``extend()``)."""
    return "parametrizations" in module._modules and parametrize.is_parametrized(module)


@contextmanager
def frozen_tensors(module: nn.Module, values: dict[str, Tensor]) -> Iterator[None]:
    """Inside the block, ``getattr(module, name)`` is ``values[name]`` for each reparametrized tensor.

    Nothing is recomputed, and the module's state (originals, spectral norm's vectors) is
    not touched. For :attr:`Form.PARAMETRIZE` the value is placed in
    ``torch.nn.utils.parametrize``'s cache of evaluated parametrizations (a
    ``parametrize.cached()`` block; the previous entry is restored on exit); for
    :attr:`Form.HOOK` the attribute is set and the pre-hook that would recompute it on a
    call of the module is lifted for the duration.

    Args:
        module: A module with reparametrized tensors.
        values: Name -> the value to read (names without a value are left alone).
    """
    reparams = [rp for rp in reparametrizations(module) if rp.name in values]
    hooks = module._forward_pre_hooks
    saved_hooks = dict(hooks)
    saved_attributes = {rp.name: module.__dict__.get(rp.name) for rp in reparams if rp.form is Form.HOOK}
    with parametrize.cached():
        cache = parametrize._cache  # bound per outermost cached() block
        keys = [(id(module), rp.name) for rp in reparams if rp.form is Form.PARAMETRIZE]
        saved_cache = {key: cache.get(key) for key in keys}
        try:
            for rp in reparams:
                if rp.form is Form.PARAMETRIZE:
                    cache[(id(module), rp.name)] = values[rp.name]
                else:
                    module.__dict__[rp.name] = values[rp.name]
                    hooks.pop(rp.hook_key, None)
            yield
        finally:
            for key, old in saved_cache.items():
                if old is None:
                    cache.pop(key, None)
                else:
                    cache[key] = old
            for name, old in saved_attributes.items():
                module.__dict__[name] = old
            hooks.clear()
            hooks.update(saved_hooks)


def effective_values(
    module: nn.Module, reparams: Sequence[Reparametrization], latest: dict[tuple[int, str], Tensor]
) -> dict[str, Tensor]:
    """The value of each reparametrized tensor that a call of ``module`` has just used.

    Args:
        module: The module, right after its call.
        reparams: Its reparametrizations.
        latest: ``(id(module), name) -> `` the last output of each
            ``ParametrizationList`` (captured by a forward hook of the engine).
    """
    values = {}
    for rp in reparams:
        value = latest.get((id(module), rp.name)) if rp.form is Form.PARAMETRIZE else module.__dict__.get(rp.name)
        if isinstance(value, Tensor):
            values[rp.name] = value
    return values


def graph_hessian_diagonal(
    output: Tensor, wrt: Sequence[Tensor], r: Tensor, chunk: int = HESSIAN_CHUNK
) -> list[Tensor]:
    r"""Diagonal of :math:`\nabla^2_\theta (r^\top \mathrm{output}(\theta))` through ``output``'s autograd graph.

    Args:
        output: A tensor computed from ``wrt`` (its graph must be intact).
        wrt: The leaves :math:`\theta`.
        r: Weights shaped like ``output``.
        chunk: One-hot Hessian-vector products per backward pass.

    Returns:
        One tensor per entry of ``wrt``, shaped like it.
    """
    wrt = list(wrt)
    with torch.enable_grad():
        first = torch.autograd.grad([output], wrt, [r], retain_graph=True, create_graph=True, allow_unused=True)
    curved = [(g, i) for i, g in enumerate(first) if g is not None and g.requires_grad]
    sizes = [t.numel() for t in wrt]
    total = sum(sizes)
    if not curved:
        return [torch.zeros_like(t) for t in wrt]
    offsets = [sum(sizes[:i]) for i in range(len(wrt))]
    pieces = []
    for start in range(0, total, chunk):
        stop = min(total, start + chunk)
        eye = torch.zeros(stop - start, total, dtype=r.dtype, device=r.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        vectors = [eye[:, offsets[i] : offsets[i] + sizes[i]].reshape(-1, *wrt[i].shape) for _, i in curved]
        rows = batched_grad([g for g, _ in curved], wrt, vectors)
        flat = torch.cat(
            [eye.new_zeros(stop - start, n) if h is None else h.reshape(stop - start, -1) for h, n in zip(rows, sizes)],
            1,
        )
        pieces.append(flat[torch.arange(stop - start), torch.arange(start, stop)])
    diagonal = torch.cat(pieces)
    return [d.reshape(t.shape) for d, t in zip(diagonal.split(sizes), wrt)]


class ReparametrizedRule(LayerRule):
    r"""The rule of a module with reparametrized tensors, by the chain rule through the parametrizations.

    Args:
        inner: The rule of the module type, which treats each effective tensor as a parameter.
        reparams: The module's reparametrizations.
    """

    def __init__(self, inner: LayerRule, reparams: Sequence[Reparametrization]) -> None:
        self.inner = inner
        self.reparams = tuple(reparams)

    def parameters(self, module: nn.Module) -> dict[str, nn.Parameter]:
        """The inner rule's parameters and the originals of every reparametrized tensor (names relative to module)."""
        originals = {name for rp in self.reparams for name in rp.originals}
        params = {k: p for k, p in rule_parameters(self.inner, module).items() if k not in originals}
        for rp in self.reparams:
            for name in rp.originals:
                params[name] = module.get_parameter(name)
        return params

    def _values(self, module: nn.Module, inputs: Sequence[Tensor]) -> dict[str, Tensor]:
        values = dict(getattr(inputs, "effective", None) or {})
        for rp in self.reparams:
            if rp.name not in values:
                if getattr(inputs, "effective", None) is not None:
                    raise ExtensionError(
                        f"{type(module).__name__}: no value of its reparametrized tensor '{rp.name}' was recorded in "
                        "this call (was it evaluated before the forward, e.g. in a parametrize.cached() block opened "
                        "outside extend()?). Evaluate the parametrization inside the module's forward."
                    )
                values[rp.name] = getattr(module, rp.name)  # a call outside the engine (check_rule): evaluate now
        return values

    def per_example_grads(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        r"""``[V, N, *p]``: the inner rule's gradients, those of effective tensors mapped by :math:`J_f^\top`."""
        values = self._values(module, inputs)
        with frozen_tensors(module, values):
            grads = dict(self.inner.per_example_grads(module, inputs, grad_output))
        for rp in self.reparams:
            effective = grads.pop(rp.name, None)
            if effective is None:
                raise UnsupportedModuleError(
                    f"the rule {self.inner!r} of {type(module).__name__} gives no gradient of its reparametrized "
                    f"tensor '{rp.name}'. Register a rule for this module type that returns '{rp.name}' whenever "
                    f"module.{rp.name}.requires_grad."
                )
            lead = effective.shape[:2]
            originals = [module.get_parameter(name) for name in rp.originals]
            mapped = batched_grad([values[rp.name]], originals, [effective.flatten(0, 1)])
            for name, p, g in zip(rp.originals, originals, mapped):
                grads[name] = effective.new_zeros(*lead, *p.shape) if g is None else g.reshape(*lead, *p.shape)
        return grads

    def _vector_slices(self, module: nn.Module, grad_output: Tensor | tuple[Tensor, ...]) -> list[slice]:
        """Slices of the ``V`` vectors whose per-example gradients stay within :data:`VECTOR_ELEMENTS`."""
        first = grad_output[0] if isinstance(grad_output, tuple) else grad_output
        v, n = first.shape[:2]
        per_vector = n * sum(p.numel() for p in self.parameters(module).values())
        size = max(1, VECTOR_ELEMENTS // max(per_vector, 1))
        return [slice(i, min(i + size, v)) for i in range(0, v, size)]

    @staticmethod
    def _take(grad_output: Tensor | tuple[Tensor, ...], s: slice) -> Tensor | tuple[Tensor, ...]:
        return tuple(g[s] for g in grad_output) if isinstance(grad_output, tuple) else grad_output[s]

    def weighted_squared_sum(
        self,
        module: nn.Module,
        inputs: Sequence[Tensor],
        grad_output: Tensor,
        weights: Tensor | None,
        per_example: bool,
    ) -> ParamDict:
        r""":math:`\sum_v w_{vn} (g^{(v)}_n)^2` from :meth:`per_example_grads`, a slice of the vectors at a time.

        Peak memory is about that of ``BatchGrad`` (``N`` gradients of all parameters)
        instead of ``V`` times that.
        """
        total: ParamDict = {}
        for s in self._vector_slices(module, grad_output):
            grads = self.per_example_grads(module, inputs, self._take(grad_output, s))
            w = None if weights is None else weights[s]
            for name, g in grads.items():
                part = weighted_square_reduce(g, w, per_example)
                total[name] = part if name not in total else total[name].add_(part)
        return total

    def squared_norms(self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor) -> ParamDict:
        r""":math:`\|g^{(v)}_n\|^2`, ``[V, N]`` per parameter, a slice of the vectors at a time."""
        parts = [
            {
                name: squared_norms(g)
                for name, g in self.per_example_grads(module, inputs, self._take(grad_output, s)).items()
            }
            for s in self._vector_slices(module, grad_output)
        ]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}

    def own_hessian_term(
        self, module: nn.Module, inputs: Sequence[Tensor], grad_output: Tensor, per_example: bool
    ) -> ParamDict:
        r"""The parametrizations' second derivatives :math:`\operatorname{diag} \nabla^2_\theta (r^\top f(\theta))`.

        :math:`r = \partial L/\partial W` (per example :math:`r_n` if ``per_example``).
        ``grad_output`` is ``[N, *out]``. Exact for inner rules of modules affine in their
        parameters (every built-in rule); the Hessian of a module handled by the generic
        rule couples the entries of :math:`W` and raises.
        """
        if type(self.inner).own_hessian_term is not LayerRule.own_hessian_term:
            raise UnsupportedModuleError(
                f"DiagHessian of {type(module).__name__} with a reparametrized tensor "
                f"'{self.reparams[0].name}': its rule ({self.inner!r}) does not say that the module is affine in "
                "that tensor, and the Hessian through the parametrization would need the full second derivative "
                "in it. Register a rule for the module type, or use DiagGGNExact."
            )
        values = self._values(module, inputs)
        vectors = tuple(g.unsqueeze(0) for g in grad_output) if isinstance(grad_output, tuple) else grad_output[None]
        with frozen_tensors(module, values):
            grads = self.inner.per_example_grads(module, inputs, vectors)
        result: ParamDict = {}
        for rp in self.reparams:
            r = grads[rp.name][0]  # [N, *W]
            originals = [module.get_parameter(name) for name in rp.originals]
            if per_example:
                rows = [graph_hessian_diagonal(values[rp.name], originals, r_n) for r_n in r]
                terms = [torch.stack(column) for column in zip(*rows)]
            else:
                terms = graph_hessian_diagonal(values[rp.name], originals, r.sum(0))
            result.update(zip(rp.originals, terms))
        return result

    def input_curvature(self, module: nn.Module, inputs: Sequence[Tensor], output_weights: Tensor) -> Tensor | None:
        """The inner rule's, with the effective tensors frozen at the call's values."""
        with frozen_tensors(module, self._values(module, inputs)):
            return self.inner.input_curvature(module, inputs, output_weights)

    def input_vjp(self, module: nn.Module, inputs: Sequence[Tensor], vectors: Tensor) -> Tensor | None:
        """The inner rule's, with the effective tensors frozen at the call's values."""
        with frozen_tensors(module, self._values(module, inputs)):
            return self.inner.input_vjp(module, inputs, vectors)

    def touches_one_output(self, module: nn.Module, inputs: Sequence[Tensor]) -> bool:
        """False: an original generally reaches every entry of the tensor it parametrizes."""
        return False

    def __repr__(self) -> str:
        return f"ReparametrizedRule({self.inner!r}, {[rp.name for rp in self.reparams]})"


def wrap_reparametrized(
    module: nn.Module, rule: LayerRule, reparams: tuple[Reparametrization, ...] | None = None
) -> LayerRule:
    """``rule``, wrapped in a :class:`ReparametrizedRule` if ``module`` has reparametrized tensors.

    Args:
        module: The module.
        rule: Its rule for the effective tensors.
        reparams: ``reparametrizations(module)`` if the caller has it already (``None``: found here).
    """
    if reparams is None:
        reparams = reparametrizations(module)
    return ReparametrizedRule(rule, reparams) if reparams else rule
