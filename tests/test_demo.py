"""The demo of ``python -m secorder_hooks`` runs and reports every quantity."""

import subprocess
import sys

import pytest
import torch

import secorder_hooks
from secorder_hooks import demo
from secorder_hooks.quantities import Quantity


def test_available_quantities_covers_every_exported_quantity() -> None:
    exported = {
        name
        for name in secorder_hooks.__all__
        if isinstance(getattr(secorder_hooks, name), type)
        and issubclass(getattr(secorder_hooks, name), Quantity)
        and name != "Quantity"
    }
    assert {type(q).__name__ for q in demo.available_quantities()} == exported
    assert {"BatchGrad", "DiagGGNExact", "DiagHessian"} <= exported


def test_run_problem_norms_match_direct_computation() -> None:
    problem = demo.builtin_problems(batch_size=6)[0]
    [result] = demo.run_problem(problem, [secorder_hooks.BatchGrad()], repeats=1)
    assert result.error is None and result.seconds > 0
    with secorder_hooks.extend(problem.model, secorder_hooks.BatchGrad()):
        problem.forward_backward()
    for name, p in problem.model.named_parameters():
        assert result.norms[name] == pytest.approx(p.grad_batch.norm().item(), rel=1e-5)


def test_run_problem_removes_the_attributes() -> None:
    problem = demo.builtin_problems(batch_size=4)[0]
    demo.run_problem(problem, [secorder_hooks.SumGradSquared()], repeats=1)
    assert not any(hasattr(p, "sum_grad_squared") for p in problem.model.parameters())


def test_unavailable_quantity_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise secorder_hooks.UnsupportedOperationError("refused for the test")

    monkeypatch.setattr(demo.secorder_hooks, "extend", refuse)
    problem = demo.builtin_problems(batch_size=4)[1]
    [result] = demo.run_problem(problem, [secorder_hooks.DiagHessian()], repeats=1)
    assert result.seconds is None and "refused for the test" in result.error
    table = demo.format_table(problem, [result], t0=1.0)
    assert table.splitlines()[-1].split()[1:] == ["n/a"] * (1 + len(list(problem.model.parameters())))


def test_cli_prints_a_row_per_quantity_for_each_problem() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "secorder_hooks", "--batch-size", "8", "--repeats", "1"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    rows = [line.split() for line in out.splitlines()]
    for q in demo.available_quantities():
        q_rows = [r for r in rows if r and r[0] == q.attribute]
        assert len(q_rows) == 2, out  # one per built-in problem
        for r in q_rows:
            if r[1] != "n/a":
                assert float(r[1]) > 0 and all(float(v) >= 0 for v in r[2:])
    assert torch.__version__ in out
