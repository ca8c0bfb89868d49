"""The state of one :func:`~secorder_hooks.extend` context: hooks, records, checks."""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import Node
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.hooks import RemovableHandle

from secorder_hooks.engine.broadcast import Watched, root_batch_size, watch
from secorder_hooks.engine.options import EngineOptions
from secorder_hooks.engine.records import GraphOwned, RecordStore
from secorder_hooks.errors import ExtensionError, UnsupportedModuleError
from secorder_hooks.losses.calls import LossCall
from secorder_hooks.quantities import Needs, Quantity
from secorder_hooks.rules.base import LayerRule, implements, rule_parameters
from secorder_hooks.rules.lookup import rule_for
from secorder_hooks.rules.reparametrized import (
    Form,
    Reparametrization,
    effective_values,
    parametrization_modules,
    reparametrizations,
)

__all__ = ["Session", "Misuse", "active_sessions", "isolated"]


@dataclass(eq=False)
class _LossEntry:
    """A loss call without its result, which it refers to weakly.

    The entry is owned by the result's node; holding the result itself would be a cycle
    through that node that the garbage collector cannot see.
    """

    call: LossCall
    result: weakref.ref[Tensor]
    node_id: int = 0
    """``id`` of the result's node (unique while the entry lives: the node owns it)."""


@dataclass(eq=False)
class Misuse:
    """A trainable parameter used while none of its modules runs, and the node of the result it entered."""

    name: str
    node: Node


class Session:
    """Installs the engine on a model and removes every trace of it on :meth:`close`.

    Args:
        model: The model whose trainable parameters receive the quantities.
        quantities: The quantities to compute in each backward pass.
        options: Engine options (chunking of curvature columns).
        ddp: The model if it is a ``DistributedDataParallel`` (``engine.sync.ddp_of``).
        sync_group: The process group to synchronize the quantities over, or ``None``
            (``engine.sync.sync_group``).
    """

    def __init__(
        self,
        model: nn.Module,
        quantities: Sequence[Quantity],
        options: EngineOptions,
        ddp: nn.Module | None = None,
        sync_group: Any = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"extend() expects an nn.Module, got {type(model).__name__}.")
        for q in quantities:
            if not isinstance(q, Quantity):
                raise TypeError(f"extend() got {q!r}; pass quantity instances such as secorder_hooks.BatchGrad().")
        attributes = Counter(q.attribute for q in quantities)
        if any(count > 1 for count in attributes.values()):
            raise ValueError(f"extend() got the same quantity twice: {list(quantities)}.")
        self.model = model
        self.quantities = tuple(quantities)
        self._needs = {id(q): q.needs for q in self.quantities}  # asked once: quantities are immutable
        self.options = options
        self.ddp = ddp
        """The model if it is a ``DistributedDataParallel`` (its ``.grad`` are averaged over processes)."""
        self.sync_group = sync_group
        """The process group the quantities are synchronized over, or ``None``."""
        self.params: dict[int, nn.Parameter] = {}
        self.owners: dict[int, list[nn.Module]] = {}
        self.param_names: dict[int, str] = {}
        self.module_names: dict[nn.Module, str] = {}
        self.rules: dict[nn.Module, LayerRule] = {}
        self.owned: dict[nn.Module, dict[str, nn.Parameter]] = {}
        """Rule and covered trainable parameters of every module that has any."""
        named_modules = list(model.named_modules())
        inside_parametrizations = parametrization_modules(module for _, module in named_modules)
        self.reparametrized: dict[nn.Module, tuple[Reparametrization, ...]] = {}
        """Modules with reparametrized tensors, whose rules cover the originals."""
        self.latest_effective: dict[tuple[int, str], Tensor] = {}
        """``(id(module), name) ->`` the last value of each parametrization evaluated."""
        for module_name, module in named_modules:
            self.module_names.setdefault(module, module_name)
            if module in inside_parametrizations:
                continue  # its parameters are originals of the parametrized module
            if reparams := reparametrizations(module):
                self.reparametrized[module] = reparams
            rule = rule_for(module, reparams)
            owned = rule_parameters(rule, module)
            if owned:
                self.rules[module], self.owned[module] = rule, owned
            for p_name, p in owned.items():
                self.params[id(p)] = p
                self.owners.setdefault(id(p), []).append(module)
                self.param_names.setdefault(id(p), f"{module_name}.{p_name}" if module_name else p_name)
        if not self.owners:
            raise ExtensionError(
                f"extend() got a model ({type(model).__name__}) without trainable parameters; "
                "there is nothing to compute. Check requires_grad of its parameters."
            )
        self._check_rule_methods()
        self.records = RecordStore()
        # Owned by the graphs of the forward passes (see GraphOwned): an evaluation forward with
        # gradients enabled, never backpropagated, leaves nothing behind once its tensors are dropped.
        self._loss_calls: GraphOwned[_LossEntry] = GraphOwned()
        self.misused: GraphOwned[Misuse] = GraphOwned()
        self.batch_size: int | None = None
        """Examples of the model call running now (dim 0 of its first tensor input), if known."""
        self.watched: dict[int, Watched] = {}
        """Outputs of one-output calls of the running model call, by id, for broadcasts over the examples
        (see engine.broadcast); emptied when the call returns."""
        self._active: Counter[int] = Counter()
        self._handles: list[RemovableHandle] = []
        self.in_backward = False
        """Whether the engine's backward pass is running (a re-entrant ``loss.backward()`` raises)."""
        self.suspended = False  # while set (isolated()), nothing is recorded and the mode passes calls through

    # ----------------------------------------------------------------- lifetime
    def open(self) -> None:
        """Register the hooks and mark the session active (the caller pushes its torch-function mode).

        Raises:
            ExtensionError: Another ``extend()`` context is active: a backward pass is
                handled by the innermost context alone, so the outer one's quantities
                would be silently dropped.
        """
        outer = active_sessions()
        if outer:
            other = outer[-1]
            raise ExtensionError(
                f"extend() on {type(self.model).__name__} was entered inside another active extend() context (on "
                f"{type(other.model).__name__}, computing {', '.join(map(repr, other.quantities))}). Contexts do "
                "not nest: a backward pass is handled by the innermost one only, so the outer one's quantities "
                "would be silently dropped. Use one context with all quantities, extend(model, BatchGrad(), "
                "DiagGGNExact(), ...); for several models in one backward pass, extend a module that holds "
                "them all (e.g. nn.ModuleList([a, b]))."
            )
        try:
            for module, name in self.module_names.items():
                if isinstance(module, _BatchNorm):
                    self._handles.append(module.register_forward_hook(self._check_batchnorm))
                if module in self.owned:
                    # first, before a reparametrization pre-hook (deprecated weight_norm) uses the originals
                    self._handles.append(module.register_forward_pre_hook(self._enter_module, prepend=True))
                    self._handles.append(
                        module.register_forward_hook(self._record_call(name), with_kwargs=True, always_call=True)
                    )
            for module, reparams in self.reparametrized.items():
                for rp in reparams:
                    if rp.form is Form.PARAMETRIZE:
                        hook = self._capture_parametrization(module, rp.name)
                        self._handles.append(module.parametrizations[rp.name].register_forward_hook(hook))
            self._handles.append(self.model.register_forward_pre_hook(self._enter_root, with_kwargs=True))
            self._handles.append(self.model.register_forward_hook(self._record_root, always_call=True))
            _open_sessions().append(self)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove every hook and recorded tensor; idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        opened = _open_sessions()
        if self in opened:
            opened.remove(self)
        self.reset_pass()
        self._active.clear()

    def needs_of(self, quantity: Quantity) -> Needs:
        """What ``quantity`` (one of the session's) needs, as it said when ``extend()`` started."""
        return self._needs[id(quantity)]

    def _check_rule_methods(self) -> None:
        """Raise before any forward pass if a quantity needs a rule method a covered module's rule lacks.

        Raises:
            UnsupportedModuleError: With the quantity's message naming the module and the remedy.
        """
        for q in self.quantities:
            for method in self.needs_of(q).rule_methods:
                for module, rule in self.rules.items():
                    if not implements(rule, method):
                        raise UnsupportedModuleError(q.missing_rule(method, self.module_names[module], module))

    def reset_pass(self) -> None:
        """Forget what the forward passes since the last backward recorded."""
        self.records.clear()
        self._loss_calls.clear()
        self.latest_effective.clear()
        self.misused.clear()
        self.watched.clear()

    # ----------------------------------------------------------------- loss calls
    def add_loss_call(self, call: LossCall) -> None:
        """Keep a recognized loss call for as long as its result's graph lives."""
        entry = _LossEntry(replace(call, result=None), weakref.ref(call.result), id(call.result.grad_fn))  # type: ignore[arg-type]
        self._loss_calls.add(entry, call.result.grad_fn)

    @property
    def loss_calls(self) -> list[LossCall]:
        """The recognized loss calls since the last backward whose result is still alive."""
        calls = []
        for entry in self._loss_calls:
            result = entry.result()
            if result is not None:
                calls.append(replace(entry.call, result=result))
        return calls

    def loss_call_of(self, node: object) -> LossCall | None:
        """The recognized loss call whose result's node is ``node`` (its result may be gone), or ``None``."""
        for entry in self._loss_calls:
            if entry.node_id == id(node):
                return entry.call
        return None

    # ----------------------------------------------------------------- hooks
    def _enter_module(self, module: nn.Module, args: tuple) -> None:
        self._active[id(module)] += 1

    def _record_call(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
            self._active[id(module)] -= 1
            if torch.is_grad_enabled() and not self.records.paused and not self.suspended:
                # The engine's own tensor calls bypass its torch-function mode (about 20 us each otherwise).
                effective = None
                if module in self.reparametrized:
                    effective = effective_values(module, self.reparametrized[module], self.latest_effective)
                with torch._C.DisableTorchFunction():
                    count = self.records.pending_count
                    replaced = self.records.record(module, name, args, kwargs, output, effective, self.batch_size)
                    if self.batch_size is not None and self.records.pending_count > count:
                        watch(self.watched, self.records.last, output if replaced is None else replaced)
                    return replaced
            return None

        return hook

    def _capture_parametrization(self, module: nn.Module, tensor_name: str):
        key = (id(module), tensor_name)

        def hook(plist: nn.Module, args: tuple, output: Tensor) -> None:
            self.latest_effective[key] = output

        return hook

    def _enter_root(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        with torch._C.DisableTorchFunction():
            self.batch_size = root_batch_size(module, args, kwargs)

    def _record_root(self, module: nn.Module, args: tuple, output: object) -> None:
        self.batch_size = None
        self.watched.clear()  # broadcasts happen inside the model call
        with torch._C.DisableTorchFunction():
            if isinstance(output, Tensor) and output.grad_fn is not None and not self.suspended:
                self.records.seal(output)

    def _check_batchnorm(self, module: nn.Module, args: tuple, output: object) -> None:
        if module.training and torch.is_grad_enabled() and not self.records.paused and not self.suspended:
            raise UnsupportedModuleError(
                f"{type(module).__name__} '{self.module_names[module]}' is in training mode: it normalizes with "
                "batch statistics, which mixes the examples, so per-example quantities are undefined. "
                "Call model.eval() (uses running statistics) or replace it with nn.GroupNorm."
            )

    def check_parameter_use(self, args: tuple, kwargs: dict, result: object) -> None:
        """Note trainable parameters used while none of their owning modules runs.

        ``result`` is what the operation returned (composite functions may return several
        tensors, e.g. ``F.multi_head_attention_forward``). The node of each differentiable
        result is kept so the backward pass can tell whether the loss depends on it.
        """
        owners, active = self.owners, self._active
        unowned = None
        for arg in (*args, *kwargs.values()) if kwargs else args:
            # a dict lookup by id first: the session holds its parameters, so a hit is one of them
            for a in arg if isinstance(arg, (list, tuple)) else (arg,):
                modules = owners.get(id(a))
                if modules is None:
                    continue
                for m in modules:
                    if active.get(id(m), 0) > 0:
                        break
                else:
                    unowned = [*(unowned or ()), id(a)]
        if unowned is None:  # the common case: no parameter, or one used inside its module
            return
        for out in result if isinstance(result, (tuple, list)) else (result,):
            node = out.grad_fn if isinstance(out, Tensor) else None
            if node is not None:
                for key in unowned:
                    self.misused.add(Misuse(self.param_names[key], node), node)


_THREAD = threading.local()


def _open_sessions() -> list[Session]:
    """The sessions opened and not yet closed in this thread, innermost last (as the mode stack, per thread)."""
    opened = getattr(_THREAD, "sessions", None)
    if opened is None:
        opened = _THREAD.sessions = []
    return opened


def active_sessions() -> list[Session]:
    """The sessions of the active, not suspended ``extend()`` contexts of this thread, innermost last."""
    return [session for session in _open_sessions() if not session.suspended]


@contextmanager
def isolated() -> Iterator[None]:
    """Suspend the active ``extend()`` contexts, so that a new one may run inside the block.

    For the function API, which runs the engine on the user's behalf: the user's contexts
    record nothing of its forward and backward passes, and resume afterwards.
    """
    sessions = active_sessions()
    for session in sessions:
        session.suspended = True
    try:
        yield
    finally:
        for session in sessions:
            session.suspended = False
