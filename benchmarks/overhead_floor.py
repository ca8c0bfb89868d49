r"""What a per-example quantity costs at the least: ours next to hand-written hooks without any check.

Usage (from ``benchmarks/``): ``python overhead_floor.py [--reps 15] [--problems A small]``.

The quantity is ``BatchL2Grad`` (:math:`\|\nabla_\theta c\,\ell_n\|^2` per example) on the MLPs of
:mod:`problems` (Linear and ReLU only), whose arithmetic is six small reductions per layer. Rows,
each ``median [q1, q3]`` of ``time / T0`` (interleaved, see :mod:`timing`):

- ``ours``: ``with extend(model, BatchL2Grad()): loss.backward()``, entered every step (as
  :mod:`table` measures it);
- ``hand-written, hooks per step``: a forward hook per Linear layer that registers a tensor hook on
  its output, computing :math:`\|g_n\|^2 \|x_n\|^2` and :math:`\|g_n\|^2`; the hooks are registered
  and removed every step, as a context manager must;
- ``hand-written, hooks kept``: the same hooks registered once;
- ``hand-written, no arithmetic``: the kept hooks with an empty tensor hook: torch's own cost of
  a Python forward hook and a tensor hook per layer;
- ``BackPACK``: ``backpack.extensions.BatchL2Grad`` where it is installed.

The hand-written hooks check nothing: not that the examples stay separate (batch statistics), that
parameters are used only by their modules, that a module's output carries the batch on dim 0, or
which loss and reduction produced the gradient; they assume a Linear-only model and a loss whose
gradient is already the per-example one. They are the floor of any hook-based implementation.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from ours import OurQuantity, engine_step, plain_step
from peers import Peer, methods_for
from problems import Problem, ProblemName, make_problem
from timing import THREADS, machine_description, reset_parameters, setup_torch, time_interleaved
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

__all__ = ["hand_written_hooks", "main"]

Step = Callable[[], object]


def _linear_layers(model: nn.Module) -> list[nn.Linear]:
    layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    others = [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]
    if len(others) != len(layers):
        raise ValueError("the hand-written hooks handle Linear layers only")
    return layers


def hand_written_hooks(model: nn.Module, arithmetic: bool = True) -> list[RemovableHandle]:
    r"""Register the minimal ``BatchL2Grad`` hooks on every Linear layer of ``model``.

    For a layer with input ``x`` ``[N, D_in]`` and output gradient ``g`` ``[N, D_out]``:
    ``weight.batch_l2`` :math:`= \|g_n\|^2 \|x_n\|^2` and ``bias.batch_l2`` :math:`= \|g_n\|^2`,
    both ``[N]``.

    Args:
        model: A model whose only parameter-owning modules are ``nn.Linear`` on ``[N, D]`` inputs.
        arithmetic: Whether the tensor hook computes the norms (``False``: an empty hook).

    Returns:
        The forward hooks' handles (remove them to uninstall).
    """

    def forward_hook(layer: nn.Linear, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x = inputs[0].detach()

        def tensor_hook(g: Tensor) -> None:
            if arithmetic:
                g2 = torch.linalg.vector_norm(g, dim=1).square_()
                layer.weight.batch_l2 = g2 * torch.linalg.vector_norm(x, dim=1).square_()
                layer.bias.batch_l2 = g2

        output.register_hook(tensor_hook)

    return [layer.register_forward_hook(forward_hook) for layer in _linear_layers(model)]


def _hooks_per_step(problem: Problem) -> Step:
    def step() -> None:
        reset_parameters(problem.model, ["batch_l2"])
        handles = hand_written_hooks(problem.model)
        try:
            problem.loss().backward()
        finally:
            for handle in handles:
                handle.remove()

    return step


def _hooks_kept(problem: Problem, arithmetic: bool) -> Step:
    hand_written_hooks(problem.model, arithmetic)  # on this problem's own copy, for good

    def step() -> None:
        reset_parameters(problem.model, ["batch_l2"])
        problem.loss().backward()

    return step


def _backpack_step(problem: Problem) -> Step | None:
    """BackPACK's ``BatchL2Grad`` step (the adapter of :mod:`peers`), ``None`` without BackPACK."""
    try:
        return methods_for([Peer.BACKPACK], [OurQuantity.BATCH_L2_GRAD])[0].build(problem).step
    except ImportError:
        return None


def measure(name: ProblemName, reps: int, min_time: float) -> tuple[float, dict[str, str]]:
    """``T0`` in ms and ``row -> "median [q1, q3]"`` of ``time / T0`` for problem ``name``."""
    problem = make_problem(name)

    def fresh() -> Problem:
        return copy.deepcopy(problem)

    ours, kept = fresh(), fresh()
    steps: dict[str, Step] = {
        "T0": plain_step(problem),
        "ours": engine_step(ours, OurQuantity.BATCH_L2_GRAD),
        "hand-written, hooks per step": _hooks_per_step(fresh()),
        "hand-written, hooks kept": _hooks_kept(kept, arithmetic=True),
        "hand-written, no arithmetic": _hooks_kept(fresh(), arithmetic=False),
    }
    backpack_step = _backpack_step(fresh())
    if backpack_step is not None:
        steps["BackPACK"] = backpack_step
    for step in steps.values():
        step()
    for (key, p), q in zip(ours.model.named_parameters(), kept.model.parameters()):
        if not torch.allclose(p.batch_l2, q.batch_l2, rtol=1e-4, atol=0):
            raise AssertionError(f"the hand-written hooks disagree with ours on {key}")
    ratios = time_interleaved(steps, "T0", reps=reps, min_time=min_time)
    return ratios["T0"].seconds * 1e3, {row: str(ratio) for row, ratio in ratios.items() if row != "T0"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--problems", nargs="+", default=["A", "small"], choices=["A", "C", "small"])
    parser.add_argument("--min-time", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads")
    args = parser.parse_args(argv)
    setup_torch(args.threads)
    columns = {ProblemName(p): measure(ProblemName(p), args.reps, args.min_time) for p in args.problems}
    print(f"Machine: {machine_description()}\n")
    print(
        "| BatchL2Grad, time / T0 | "
        + " | ".join(f"{p.value} (T0 {t0:.2f} ms)" for p, (t0, _) in columns.items())
        + " |"
    )
    print("|---|" + "---|" * len(columns))
    for row in next(iter(columns.values()))[1]:
        print(f"| {row} | " + " | ".join(cells.get(row, "-") for _, cells in columns.values()) + " |")


if __name__ == "__main__":
    main()
