"""Steps that the benchmarks time: plain backward (``T0``), our quantities, ``[N, D]`` allocation.

A step is a zero-argument callable doing one complete iteration including cleanup of the
previous iteration's results (so that no two results are alive at once).
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import torch
from problems import Problem, num_params
from timing import reset_parameters

import secorder_hooks
from secorder_hooks import Quantity

__all__ = ["OurQuantity", "ATTRIBUTES", "make_quantity", "plain_step", "engine_step", "alloc_step", "try_step"]

Step = Callable[[], object]


class OurQuantity(enum.Enum):
    """The quantities of ours that the table reports (value = row label)."""

    BATCH_GRAD = "BatchGrad"
    SUM_GRAD_SQUARED = "SumGradSquared"
    BATCH_L2_GRAD = "BatchL2Grad"
    VARIANCE = "Variance"
    DIAG_GGN_EXACT = "DiagGGNExact"
    DIAG_GGN_MC = "DiagGGNMC(1)"
    DIAG_HESSIAN = "DiagHessian"
    KFLR = "KFLR"
    KFAC = "KFAC(1)"


_FACTORIES: dict[OurQuantity, Callable[[], Quantity]] = {
    OurQuantity.BATCH_GRAD: secorder_hooks.BatchGrad,
    OurQuantity.SUM_GRAD_SQUARED: secorder_hooks.SumGradSquared,
    OurQuantity.BATCH_L2_GRAD: secorder_hooks.BatchL2Grad,
    OurQuantity.VARIANCE: secorder_hooks.Variance,
    OurQuantity.DIAG_GGN_EXACT: secorder_hooks.DiagGGNExact,
    OurQuantity.DIAG_GGN_MC: lambda: secorder_hooks.DiagGGNMC(mc_samples=1),
    OurQuantity.DIAG_HESSIAN: secorder_hooks.DiagHessian,
    OurQuantity.KFLR: secorder_hooks.KFLR,
    OurQuantity.KFAC: lambda: secorder_hooks.KFAC(mc_samples=1),
}

ATTRIBUTES = tuple(factory().attribute for factory in _FACTORIES.values())
"""Every attribute our quantities write (deleted between iterations)."""


def make_quantity(quantity: OurQuantity) -> Quantity:
    """A fresh instance of ``quantity``."""
    return _FACTORIES[quantity]()


def plain_step(problem: Problem) -> Step:
    """``T0``: forward, loss, ``backward()`` (``.grad`` only)."""

    def step() -> None:
        reset_parameters(problem.model, ATTRIBUTES)
        problem.loss().backward()

    return step


def engine_step(problem: Problem, quantity: OurQuantity) -> Step:
    """``with extend(model, Q()): loss_fn(model(x), y).backward()`` (``.grad`` included)."""
    q = make_quantity(quantity)

    def step() -> None:
        reset_parameters(problem.model, ATTRIBUTES)
        with secorder_hooks.extend(problem.model, q):
            problem.loss().backward()

    return step


def alloc_step(problem: Problem) -> Step:
    """Allocate and fill an ``[N, D]`` float tensor (the memory bound of BatchGrad)."""
    n, d = problem.batch_size, num_params(problem.model)
    dtype = problem.inputs.dtype

    def step() -> None:
        torch.empty(n, d, dtype=dtype).fill_(1.0)

    return step


def try_step(step: Step) -> str | None:
    """Run ``step`` once; ``None`` if it worked, else ``"error: <Type>: <message>"``."""
    try:
        step()
    except Exception as error:  # a quantity not implemented yet must not stop the benchmark
        message = str(error).splitlines()[0] if str(error) else ""
        return f"error: {type(error).__name__}: {message[:70]}"
    return None
