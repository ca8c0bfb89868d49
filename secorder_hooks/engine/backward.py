"""The engine's backward pass: what ``loss.backward()`` does inside ``extend()``.

1. Before the ordinary backward, curvature quantities plan their column passes
   (:mod:`secorder_hooks.engine.curvature`), which needs the graph intact.
2. The ordinary backward runs (``.grad`` as usual); hooks capture the gradient at every
   recorded module output. The parameters it reached (and their gradients of this pass)
   are read off their ``.grad`` afterwards.
3. Checks that every parameter gradient came through recorded module calls.
4. First-order quantities are assembled from the captured output gradients; curvature
   quantities run their column passes. Both give the values of this pass, which
   :mod:`secorder_hooks.engine.accumulate` combines with the earlier passes ``.grad``
   holds and writes to the parameters; when synchronizing across processes
   (:mod:`secorder_hooks.engine.sync`), the values of this pass first become those of
   its global batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from secorder_hooks.autodiff.graph import (
    REENTRANT_CHECKPOINT_ADVICE,
    iter_nodes,
    reached_parameters,
    reentrant_checkpoint,
)
from secorder_hooks.engine.accumulate import PassValues, Window
from secorder_hooks.engine.assemble import Contributions, pass_examples
from secorder_hooks.engine.broadcast import check_batch_axes
from secorder_hooks.engine.curvature import CurvaturePlan
from secorder_hooks.engine.dispatch import compute_quantities
from secorder_hooks.engine.loss_term import select_loss_term
from secorder_hooks.engine.mixing import mixes_examples, mixing_error, suspicious_nodes
from secorder_hooks.engine.residuals import internal_nodes
from secorder_hooks.engine.session import Session
from secorder_hooks.engine.sync import Shards, scaled_loss_call, synchronize
from secorder_hooks.errors import ExtensionError, SecorderError
from secorder_hooks.quantities import Accumulation, Columns
from secorder_hooks.rules.generic import GenericRule
from secorder_hooks.rules.layout import example_count

__all__ = ["tensor_backward", "autograd_backward", "run_backward"]


def autograd_backward(
    session: Session,
    tensors: Tensor | Sequence[Tensor],
    grad_tensors: Tensor | Sequence[Tensor | None] | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    grad_variables: Any = None,
    inputs: Any = None,
) -> None:
    """Replacement of ``torch.autograd.backward`` while the context is active: as ``tensors.backward()``.

    Raises:
        ExtensionError: Several tensors: the engine computes the quantities of one loss.
    """
    tensors = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
    if grad_variables is not None:
        grad_tensors = grad_variables
    grads = (grad_tensors,) if grad_tensors is None or isinstance(grad_tensors, Tensor) else tuple(grad_tensors)
    if len(tensors) != 1 or len(grads) != 1:
        raise ExtensionError(
            f"torch.autograd.backward() inside extend() got {len(tensors)} tensors; the engine computes the "
            "quantities of one loss. Add the losses into one tensor and call loss.backward()."
        )
    tensor_backward(session, tensors[0], grads[0], retain_graph, create_graph, inputs)


def tensor_backward(
    session: Session,
    tensor: Tensor,
    gradient: Tensor | None = None,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    inputs: Any = None,
) -> None:
    """Replacement of ``Tensor.backward`` while the context is active."""
    if session.in_backward:
        raise ExtensionError("loss.backward() was called re-entrantly inside the engine's own backward pass.")
    session.in_backward = True
    try:
        run_backward(session, tensor, gradient, retain_graph, create_graph, inputs)
    finally:
        session.in_backward = False
        session.records.capturing = False


def run_backward(
    session: Session,
    loss: Tensor,
    gradient: Tensor | None,
    retain_graph: bool | None,
    create_graph: bool,
    inputs: Any,
) -> None:
    """Run ``loss.backward(...)`` and compute the session's quantities."""
    if retain_graph is None:
        retain_graph = create_graph
    params = session.params
    # a reentrant checkpoint records its block only when it recomputes it, inside the backward pass
    if len(session.records) == 0 and reentrant_checkpoint(loss.grad_fn) is None:
        reached = reached_parameters(loss.grad_fn, set(params))
        if reached:
            raise ExtensionError(
                f"loss.backward() inside extend() reaches parameter '{session.param_names[id(reached[0])]}', "
                "but no forward pass of the model was recorded since the last backward. Run the forward pass "
                "inside the `with extend(...)` block, before each backward."
            )
        torch.autograd.backward(loss, gradient, retain_graph, create_graph, inputs=inputs)
        return

    _check_examples(session)
    check_batch_mixing(session, loss)
    curvature = any(session.needs_of(q).columns is not Columns.GRADIENT for q in session.quantities)
    plan = CurvaturePlan.build(session, loss) if curvature else None
    window = Window.open(session)
    shards = _start_shards(session, loss, create_graph)

    # Which parameters this pass reaches, and their gradient of this pass, are read off ``.grad``
    # afterwards: a new ``.grad`` tensor, or an in-place accumulation into the old one (its version
    # counter moves). A tensor hook is needed only for the gradient of this pass of a parameter that
    # already has a ``.grad`` (Variance without accumulation; with it, Variance uses all of ``.grad``);
    # hooks on the others would make AccumulateGrad copy. Under DistributedDataParallel, ``.grad`` holds
    # the average over processes (also for parameters this process's forward did not use): hooks on every
    # parameter tell what this pass reached and its own gradients.
    before = {key: (p.grad, p.grad._version if p.grad is not None else 0) for key, p in params.items()}
    param_grads: dict[int, Tensor] = {}
    wants_grads = _has_variance(session) and not session.options.accumulate
    handles = [
        p.register_hook(_store_into(param_grads, key))
        for key, p in params.items()
        if session.ddp is not None or (wants_grads and before[key][0] is not None)
    ]
    misuse_fired: list[str] = []
    handles += [node.register_prehook(_flag(misuse_fired, name)) for name, node in _misuse_nodes(session)]
    if plan is not None:
        handles += plan.register_capture_hooks()
    # the rules of reparametrized modules backpropagate through the parametrizations' graphs afterwards
    keep = plan is not None or any(rec.inputs.effective for rec in session.records)
    session.records.capturing = True
    try:
        try:
            torch.autograd.backward(
                loss, gradient, retain_graph=retain_graph or keep, create_graph=create_graph, inputs=inputs
            )
        finally:
            session.records.capturing = False
            for handle in handles:
                handle.remove()
        check_batch_axes(loss, [rec for rec in session.records if rec.reached])
        _quantities(session, plan, window, shards, misuse_fired, before, param_grads, retain_graph, create_graph)
    except BaseException:
        window.abandon()  # .grad may have changed: what the parameters hold would no longer match it
        raise


def _quantities(
    session: Session,
    plan: CurvaturePlan | None,
    window: Window,
    shards: Shards | None,
    misuse_fired: list[str],
    before: dict[int, tuple[Tensor | None, int]],
    param_grads: dict[int, Tensor],
    retain_graph: bool,
    create_graph: bool,
) -> None:
    """After the ordinary backward: check it, compute this pass's quantities and accumulate them."""
    params = session.params
    if misuse_fired:
        raise ExtensionError(
            f"parameter '{misuse_fired[0]}' contributes to the loss through an operation outside the forward of "
            "the module that owns it (e.g. a weight tied through a functional call in a parent module, or a "
            "penalty term added to the loss). Per-example quantities of it would be wrong. Use the weight only "
            "inside its module, or add the penalty's gradient after leaving extend()."
        )
    recomputed = [rec for rec in session.records if rec.during_backward and rec.reached and rec.inputs.effective]
    if recomputed:
        raise ExtensionError(
            f"module '{recomputed[0].name}' has a parametrized tensor and runs inside activation checkpointing with "
            f"use_reentrant=True. {REENTRANT_CHECKPOINT_ADVICE}"
        )
    contributions = Contributions.of([rec for rec in session.records if rec.reached], session.rules, session.owned)
    ddp = session.ddp is not None
    reached = list(param_grads) if ddp else _reached(params, before)
    kronecker = any(q.accumulation is Accumulation.KRONECKER for q in session.quantities)
    if shards is not None and kronecker and window.continued():
        raise ExtensionError(
            "Kronecker factors over several backward passes (an accumulation) cannot be combined across processes: "
            "the input factor's mean over the passes needs every pass's global number of examples. Call "
            "zero_grad() before each backward pass inside extend(), or pass accumulate=False."
        )
    if (ddp or shards is not None) and _has_variance(session) and window.continued():
        raise ExtensionError(
            "Variance over several backward passes (an accumulation) cannot be combined under "
            "DistributedDataParallel or across processes: .grad is not the sum of the global batch's per-example "
            "gradients. Call zero_grad() before each backward pass inside extend(), or pass accumulate=False."
        )
    if ddp:
        pass  # param_grads: this pass's gradients of this process, from the hooks
    elif session.options.accumulate:
        param_grads = {key: p.grad for key, p in params.items() if p.grad is not None}
    else:
        for key in reached:
            if key not in param_grads:
                param_grads[key] = params[key].grad
    missing = [k for k in reached if k not in contributions.by_param]
    if missing:
        raise ExtensionError(
            f"parameter '{session.param_names[missing[0]]}' received a gradient, but no recorded call of its "
            "module did: the forward pass that built this graph ran outside the `with extend(...)` block. "
            "Run the forward pass inside it."
        )
    values = PassValues()
    values.examples = pass_examples(contributions)
    session.records.paused = True
    try:
        with torch.set_grad_enabled(create_graph):
            compute_quantities(session, contributions, plan, values)
            if shards is not None:
                param_grads = synchronize(session, shards, values, param_grads)
            window.commit(values, param_grads)
    finally:
        session.records.paused = False
        if not retain_graph:
            session.reset_pass()


def _has_variance(session: Session) -> bool:
    """Whether a quantity accumulates as a variance, which needs this pass's own parameter gradients."""
    return any(q.accumulation is Accumulation.VARIANCE for q in session.quantities)


def _check_examples(session: Session) -> None:
    """Raise before any work if a recorded call had an empty batch (no examples to compute quantities of)."""
    for rec in session.records:
        empty = any(shape.numel() == 0 for shape in rec.output_shapes)
        if empty and example_count(rec.module, rec.inputs, rec.output_shapes) == 0:
            raise ExtensionError(
                f"module '{rec.name}' ({type(rec.module).__name__}) was called with an empty batch (N = 0): there "
                "are no examples to compute per-example quantities or curvature of. Skip empty batches "
                "(e.g. `if len(x) == 0: continue`) before the forward pass."
            )


def check_batch_mixing(session: Session, loss: Tensor) -> None:
    """Raise if an operation between a parameter and the model output mixes the examples.

    See :mod:`secorder_hooks.engine.mixing`; runs before the ordinary backward pass, so
    nothing is computed or attached when it raises.

    Raises:
        UnsupportedOperationError: Naming the operation.
    """
    suspicious = suspicious_nodes(loss.grad_fn)
    if not suspicious:
        return
    for rec in session.records:
        rule = session.rules.get(rec.module)
        inside = [node for node in internal_nodes(rec) if node in suspicious] if rule is not None else []
        if not inside:
            continue
        check = getattr(rule, "check", None)
        if callable(check):  # rules that know why their module mixes examples say so (BatchNorm in training mode)
            check(rec.module)
        if isinstance(rule, GenericRule):
            raise mixing_error(
                suspicious[inside[0]],
                f"inside module '{rec.name}' ({type(rec.module).__name__}), whose generic rule differentiates it one "
                "example at a time,",
            )
    try:
        term = select_loss_term(session, loss)
    except SecorderError:  # no single model output: nothing the probe could start from
        return
    below = [node for node in iter_nodes(term.edge.node) if node in suspicious]
    if below and mixes_examples(term.edge, term.shape, [rec for rec in session.records if rec.output_edges]):
        raise mixing_error(suspicious[below[0]], "between the recorded layers and the model output")


def _start_shards(session: Session, loss: Tensor, create_graph: bool) -> Shards | None:
    """Launch the all-reduce of the shard's counts when the session synchronizes across processes."""
    if session.sync_group is None or not session.quantities:
        return None
    if create_graph:
        raise ExtensionError(
            "loss.backward(create_graph=True) inside extend(..., sync=...): the all-reduce across processes is not "
            "differentiable. Pass sync=False, or differentiate without synchronizing."
        )
    call = scaled_loss_call(loss, session.loss_call_of, "extend()")
    rec = next(iter(session.records))
    examples = example_count(rec.module, rec.inputs, rec.output_shapes)
    return Shards.start(session.sync_group, call, examples, loss.device)


def _reached(params: dict[int, Tensor], before: dict[int, tuple[Tensor | None, int]]) -> list[int]:
    """The parameters whose ``.grad`` the backward pass set or accumulated into."""
    reached = []
    for key, p in params.items():
        grad, (old, version) = p.grad, before[key]
        if grad is not None and (grad is not old or grad._version != version):
            reached.append(key)
    return reached


def _store_into(store: dict[int, Tensor], key: int):
    def hook(grad: Tensor) -> None:
        store[key] = grad if key not in store else store[key] + grad

    return hook


def _flag(fired: list[str], name: str):
    def hook(grad_outputs: tuple[Tensor, ...]) -> None:
        fired.append(name)

    return hook


def _misuse_nodes(session: Session):
    return [(m.name, m.node) for m in session.misused]
