r"""Adapters that run one quantity with one library (ours or a peer) on a :class:`Problem`.

Every adapter builds, for its own copy of the problem, a *step* (one complete iteration:
cleanup, forward, loss, backward and the library's extra work; this is what is timed) and a
*result* function returning ``{parameter name: tensor}`` converted to our convention
(DESIGN.md sec. 2, :math:`L = c \sum_n \ell_n`), used only for the agreement check.
Building or running may raise: the caller shows the error as "unsupported".

Peers: BackPACK (``backpack-for-pytorch``), Opacus, torch.func, ASDL (``asdfghjkl``, module
``asdl``), torch-secorder. Each maps to the quantities it offers:

- BackPACK: all seven, under the same attribute names.
- Opacus: per-example gradients (``GradSampleModule``, ``loss_reduction="sum"`` so that
  ``grad_sample`` is :math:`c \nabla \ell_n`; training mode, the only one it records in).
- torch.func: ``vmap(grad)`` per-example gradients of :math:`c\,\ell_n` and the three
  statistics derived from them (no ``.grad``).
- ASDL: empirical Fisher diagonal (scaled to SumGradSquared), exact and MC Fisher diagonals
  (scaled to the GGN at our scale: ASDL takes :math:`\frac12\|f-y\|^2` for MSE).
- curvlinops: ``KFACLinearOperator`` factors (TYPE2 for KFLR, MC for KFAC), expand convention as ours.
- torch-secorder: ``empirical_fisher_diagonal`` (taken as SumGradSquared / c) and
  ``generalized_fisher_diagonal`` (taken as the GGN / c); both square the *batch* gradient,
  so the agreement check flags them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import torch
from ours import ATTRIBUTES, OurQuantity, engine_step, make_quantity
from problems import REAL_MODELS, Problem, num_params
from timing import reset_parameters
from torch import Tensor, nn

__all__ = ["Peer", "Method", "Built", "NotRunError", "methods_for", "PEER_MODULES"]

Q = OurQuantity
Result = dict[str, Tensor]


class Peer(enum.Enum):
    """The libraries compared (value = column label)."""

    OURS = "ours"
    BACKPACK = "BackPACK"
    OPACUS = "Opacus"
    TORCH_FUNC = "torch.func"
    ASDL = "ASDL"
    TORCH_SECORDER = "torch-secorder"
    CURVLINOPS = "curvlinops"


PEER_MODULES = {
    Peer.OURS: "secorder_hooks",
    Peer.BACKPACK: "backpack",
    Peer.OPACUS: "opacus",
    Peer.TORCH_FUNC: "torch.func",
    Peer.ASDL: "asdl",
    Peer.TORCH_SECORDER: "torch_secorder",
    Peer.CURVLINOPS: "curvlinops",
}
"""Python module of each peer (its distribution's version is read from the installed metadata)."""


class NotRunError(Exception):
    """A combination that is offered but not run (e.g. infeasible cost); the message says why."""


@dataclass
class Built:
    """A ready method: ``step`` is timed, ``result`` converts to our convention.

    ``release`` (untimed) drops the results of the last step so that methods timed in turn
    do not keep each other's memory alive.
    """

    step: Callable[[], object]
    result: Callable[[], Result]
    release: Callable[[], None]


@dataclass(frozen=True)
class Method:
    """One (peer, quantity) combination.

    Attributes:
        peer: The library.
        quantity: Our quantity it corresponds to.
        build: ``problem -> Built`` (raises if unsupported).
        note: What the peer computes, if not literally our quantity.
    """

    peer: Peer
    quantity: OurQuantity
    build: Callable[[Problem], Built]
    note: str = ""

    @property
    def key(self) -> str:
        """``"peer:quantity"``, used on the command line of the memory subprocess."""
        return f"{self.peer.value}:{self.quantity.value}"


RESULT_ATTRIBUTES = ATTRIBUTES


def _releaser(problem: Problem, store: dict[str, Result] | None = None) -> Callable[[], None]:
    """Drop every result attribute (ours, BackPACK's, Opacus', ASDL's) and ``store``."""

    def release() -> None:
        reset_parameters(problem.model, RESULT_ATTRIBUTES)
        _reset_opacus(problem)
        for module in problem.model.modules():
            if hasattr(module, "fisher"):
                delattr(module, "fisher")
        if store is not None:
            store.clear()

    return release


def _flat(value: Tensor | list[Tensor]) -> Tensor:
    """A tensor, or Kronecker factors concatenated flat (for the agreement check)."""
    return torch.cat([f.detach().flatten() for f in value]) if isinstance(value, list) else value.detach()


def _params_attr(problem: Problem, attribute: str, linear_only: bool = False) -> Result:
    return {
        name: _flat(getattr(p, attribute))
        for module_name, module in problem.model.named_modules()
        if not linear_only or isinstance(module, nn.Linear)
        for p_name, p in module.named_parameters(recurse=False)
        if p.requires_grad
        for name in [f"{module_name}.{p_name}" if module_name else p_name]
    }


# ---- ours -------------------------------------------------------------------------------


def _build_ours(quantity: OurQuantity) -> Callable[[Problem], Built]:
    def build(problem: Problem) -> Built:
        attribute = make_quantity(quantity).attribute
        return Built(engine_step(problem, quantity), lambda: _params_attr(problem, attribute), _releaser(problem))

    return build


# ---- BackPACK ---------------------------------------------------------------------------


def _build_backpack(quantity: OurQuantity) -> Callable[[Problem], Built]:
    def build(problem: Problem) -> Built:
        import backpack
        from backpack import extensions as ext

        extension = {
            Q.BATCH_GRAD: ext.BatchGrad,
            Q.SUM_GRAD_SQUARED: ext.SumGradSquared,
            Q.BATCH_L2_GRAD: ext.BatchL2Grad,
            Q.VARIANCE: ext.Variance,
            Q.DIAG_GGN_EXACT: ext.DiagGGNExact,
            Q.DIAG_GGN_MC: lambda: ext.DiagGGNMC(mc_samples=1),
            Q.DIAG_HESSIAN: ext.DiagHessian,
            Q.KFLR: ext.KFLR,
            Q.KFAC: lambda: ext.KFAC(mc_samples=1),
        }[quantity]()
        attribute = make_quantity(quantity).attribute
        # Models from other libraries (functional ops in forward) need BackPACK's module converter.
        converter = problem.name in REAL_MODELS
        model, loss_fn = backpack.extend(problem.model, use_converter=converter), backpack.extend(problem.loss_fn)

        def step() -> None:
            reset_parameters(model, [attribute])
            with backpack.backpack(extension):
                loss_fn(model(problem.inputs), problem.targets).backward()

        # BackPACK's convolution factors follow its own convention (see docs/kronecker.rst): compare Linear layers
        linear_only = quantity in (Q.KFLR, Q.KFAC)
        return Built(step, lambda: _params_attr(problem, attribute, linear_only), _releaser(problem))

    return build


# ---- curvlinops -------------------------------------------------------------------------


def _build_curvlinops(quantity: OurQuantity) -> Callable[[Problem], Built]:
    def build(problem: Problem) -> Built:
        import curvlinops

        fisher = curvlinops.FisherType.TYPE2 if quantity == Q.KFLR else curvlinops.FisherType.MC
        params = [p for p in problem.model.parameters() if p.requires_grad]
        store: dict[str, object] = {}

        def step() -> None:
            store.clear()
            linop = curvlinops.KFACLinearOperator(
                problem.model,
                problem.loss_fn,
                params,
                [(problem.inputs, problem.targets)],
                fisher_type=fisher,
                check_deterministic=False,
                num_data=problem.inputs.shape[0],
                num_per_example_loss_terms=1,
            )
            linop.compute_kronecker_factors()
            store["linop"] = linop

        def result() -> Result:
            linop = store["linop"]
            out: Result = {}
            for module, b in linop._gradient_covariances.items():
                out[f"{module}.weight"] = _flat([b, linop._input_covariances[module]])
                out[f"{module}.bias"] = b.detach().flatten()
            return out

        return Built(step, result, lambda: store.clear())

    return build


# ---- Opacus -----------------------------------------------------------------------------


def _reset_opacus(problem: Problem) -> None:
    """Opacus expects ``p.grad_sample`` to exist (``None`` when empty)."""
    for p in problem.model.parameters():
        if hasattr(p, "grad_sample"):
            p.grad_sample = None
        if hasattr(p, "_current_grad_sample"):
            del p._current_grad_sample


def _build_opacus(problem: Problem) -> Built:
    from opacus import GradSampleModule

    module = GradSampleModule(problem.model, batch_first=True, loss_reduction="sum", strict=True)
    module.train()  # Opacus records activations only in training mode (changes BatchNorm: flagged by the check)

    def step() -> None:
        reset_parameters(problem.model)
        _reset_opacus(problem)
        problem.loss_fn(module(problem.inputs), problem.targets).backward()

    return Built(step, lambda: _params_attr(problem, "grad_sample"), _releaser(problem))


# ---- torch.func -------------------------------------------------------------------------


def _build_torch_func(quantity: OurQuantity) -> Callable[[Problem], Built]:
    reduce: dict[OurQuantity, Callable[[Tensor], Tensor]] = {
        Q.BATCH_GRAD: lambda g: g,
        Q.SUM_GRAD_SQUARED: lambda g: g.square().sum(0),
        Q.BATCH_L2_GRAD: lambda g: g.flatten(1).square().sum(1),
        Q.VARIANCE: lambda g: g.var(0, unbiased=False),
    }

    def build(problem: Problem) -> Built:
        from torch.func import functional_call, grad, vmap

        model, c = problem.model, problem.reduction_factor
        buffers = dict(model.named_buffers())

        def example_loss(params: Result, x: Tensor, y: Tensor) -> Tensor:
            out = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            return c * problem.loss_fn_sum(out, y.unsqueeze(0))

        per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
        store: dict[str, Result] = {}

        def step() -> None:
            store.clear()
            params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
            grads = per_example(params, problem.inputs, problem.targets)
            store["result"] = {k: reduce[quantity](g) for k, g in grads.items()}

        return Built(step, lambda: store["result"], _releaser(problem, store))

    return build


# ---- ASDL -------------------------------------------------------------------------------


class _AsdlKind(enum.Enum):
    EMPIRICAL = "fisher_emp"
    EXACT = "fisher_exact"
    MC = "fisher_mc"


def _build_asdl(kind: _AsdlKind) -> Callable[[Problem], Built]:
    def build(problem: Problem) -> Built:
        import asdl

        c = problem.reduction_factor
        # ASDL: scale * sum_n (per-example terms of the summed loss); its MSE is 0.5 ||f - y||^2.
        scale = c * c if kind == _AsdlKind.EMPIRICAL else (c if problem.classification else 2 * c)
        config = asdl.FisherConfig(
            fisher_type=kind.value,
            fisher_shapes=[asdl.SHAPE_DIAG],
            loss_type=asdl.LOSS_CROSS_ENTROPY if problem.classification else asdl.LOSS_MSE,
            n_mc_samples=1,
            data_size=1,
            scale=scale,
        )
        maker = asdl.get_fisher_maker(problem.model, config)
        dummy_y = maker.setup_model_call(problem.model, problem.inputs)
        maker.setup_loss_call(problem.loss_fn_sum, dummy_y, problem.targets)

        def step() -> None:
            reset_parameters(problem.model)
            maker.forward_and_backward(calc_loss_grad=True)

        def result() -> Result:
            out: Result = {}
            for module_name, module in problem.model.named_modules():
                fisher = getattr(module, "fisher", None)
                if fisher is None or fisher.diag is None:
                    continue
                for attribute in ("weight", "bias"):
                    value = getattr(fisher.diag, attribute, None)
                    if value is not None:
                        out[f"{module_name}.{attribute}" if module_name else attribute] = value
            return out

        return Built(step, result, _releaser(problem))

    return build


# ---- torch-secorder ---------------------------------------------------------------------


def _build_tsec_empirical(problem: Problem) -> Built:
    from torch_secorder import empirical_fisher_diagonal

    store: dict[str, Result] = {}
    names = [k for k, _ in problem.model.named_parameters()]

    def step() -> None:
        reset_parameters(problem.model)
        diag = empirical_fisher_diagonal(problem.model, problem.loss_fn, problem.inputs, problem.targets)
        store["result"] = {k: d.detach() * problem.reduction_factor for k, d in zip(names, diag)}

    return Built(step, lambda: store["result"], _releaser(problem, store))


def _build_tsec_generalized(problem: Problem) -> Built:
    from torch_secorder import generalized_fisher_diagonal

    store: dict[str, Result] = {}
    names = [k for k, _ in problem.model.named_parameters()]

    def step() -> None:
        reset_parameters(problem.model)
        out = problem.model(problem.inputs)
        diag = generalized_fisher_diagonal(problem.model, out, problem.targets, loss_type="nll")
        store["result"] = {k: d.detach() * problem.reduction_factor for k, d in zip(names, diag)}

    return Built(step, lambda: store["result"], _releaser(problem, store))


def _not_run(reason: Callable[[Problem], str]) -> Callable[[Problem], Built]:
    def build(problem: Problem) -> Built:
        raise NotRunError(reason(problem))

    return build


def _per_entry(problem: Problem) -> str:
    return f"not run: one double-backward per parameter entry (D = {num_params(problem.model)})"


def _asdl_hessian(problem: Problem) -> str:
    biggest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in problem.model.modules())
    return f"not run: builds each layer's full Hessian block (up to {biggest}^2 entries, one backward per row)"


def methods_for(peers: list[Peer], quantities: list[OurQuantity]) -> list[Method]:
    """Every (peer, quantity) combination asked for, including the unsupported ones.

    Combinations a peer does not offer at all get a method whose build raises the reason.
    """
    table: dict[tuple[Peer, OurQuantity], tuple[Callable[[Problem], Built], str]] = {}
    for q in Q:
        table[(Peer.OURS, q)] = (_build_ours(q), "")
        table[(Peer.BACKPACK, q)] = (_build_backpack(q), "")
    table[(Peer.OPACUS, Q.BATCH_GRAD)] = (_build_opacus, "")
    for q in (Q.BATCH_GRAD, Q.SUM_GRAD_SQUARED, Q.BATCH_L2_GRAD, Q.VARIANCE):
        table[(Peer.TORCH_FUNC, q)] = (_build_torch_func(q), "vmap(grad), no .grad")
    table[(Peer.ASDL, Q.SUM_GRAD_SQUARED)] = (_build_asdl(_AsdlKind.EMPIRICAL), "empirical Fisher diag")
    table[(Peer.ASDL, Q.DIAG_GGN_EXACT)] = (_build_asdl(_AsdlKind.EXACT), "exact Fisher diag")
    table[(Peer.ASDL, Q.DIAG_GGN_MC)] = (_build_asdl(_AsdlKind.MC), "MC Fisher diag")
    table[(Peer.ASDL, Q.DIAG_HESSIAN)] = (_not_run(_asdl_hessian), "")
    table[(Peer.TORCH_SECORDER, Q.SUM_GRAD_SQUARED)] = (_build_tsec_empirical, "empirical_fisher_diagonal")
    table[(Peer.TORCH_SECORDER, Q.DIAG_GGN_EXACT)] = (_build_tsec_generalized, "generalized_fisher_diagonal")
    table[(Peer.TORCH_SECORDER, Q.DIAG_HESSIAN)] = (_not_run(_per_entry), "hessian_diagonal")
    for q in (Q.KFLR, Q.KFAC):
        table[(Peer.BACKPACK, q)] = (_build_backpack(q), "Linear layers compared (conv factors: own convention)")
        table[(Peer.CURVLINOPS, q)] = (_build_curvlinops(q), "KFACLinearOperator (TYPE2 / MC), no .grad")
    methods = []
    for peer in peers:
        for q in quantities:
            build, note = table.get((peer, q), (_not_run(lambda _p: "not offered"), ""))
            methods.append(Method(peer, q, build, note))
    return methods
