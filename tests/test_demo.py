"""The demo of ``python -m secorder_hooks`` runs and reports every quantity."""

import os
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
        and name not in ("Quantity", "KroneckerQuantity")  # the base classes
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
    table = demo.format_table(problem, [result])
    assert table.splitlines()[-1].split()[1:] == ["n/a"] * (1 + len(list(problem.model.parameters())))


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    """The demo as a user runs it: a fresh interpreter, default warning filters, stderr with stdout."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(
        [sys.executable, "-m", "secorder_hooks", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
        env=env,
    )


def test_cli_prints_a_row_per_quantity_for_each_problem_and_no_warning() -> None:
    run = _run_cli("--batch-size", "8", "--repeats", "1")
    out = run.stdout
    assert run.returncode == 0, out
    rows = [line.split() for line in out.splitlines()]
    for q in demo.available_quantities():
        q_rows = [r for r in rows if r and r[0] == q.attribute]
        assert len(q_rows) == 2, out  # one per built-in problem
        for r in q_rows:
            if r[1] != "n/a":
                assert float(r[1]) > 0 and all(float(v) >= 0 for v in r[2:])
    assert torch.__version__ in out
    assert ", 1 thread\n" in out and "1 threads" not in out
    assert not [line for line in out.splitlines() if "Warning" in line or "warn" in line.lower()], out
    assert "grad_batch writes N = 8 copies" in out


@pytest.mark.parametrize("option", ["--batch-size", "--repeats", "--threads"])
@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_cli_refuses_non_positive_counts(option: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main([option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}:" in err
    assert ("must be at least 1" in err) if value != "two" else ("expected a positive integer, got 'two'" in err)


def test_cli_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        demo.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"secorder_hooks {secorder_hooks.__version__}"


def test_cli_runs_the_chosen_problems_and_quantities(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--batch-size", "6", "--repeats", "1", "--threads", "2", "--problems", "cnn"]
    assert demo.main([*argv, "--quantities", "SumGradSquared", "DiagHessian"]) == 0
    out = capsys.readouterr().out
    assert "2 threads" in out and "median of 1 pair " in out
    assert "CNN" in out and "MLP" not in out
    first_cells = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert "sum_grad_squared" in first_cells and "diag_h" in first_cells
    assert not {"grad_batch", "diag_ggn_mc", "diag_ggn_exact"} & set(first_cells)
    assert "grad_batch writes" not in out
    with pytest.raises(SystemExit):
        demo.main([*argv, "--quantities", "NoSuchQuantity"])
    assert "invalid choice: 'NoSuchQuantity'" in capsys.readouterr().err


def _value_rows(out: str) -> dict[str, list[str]]:
    """Quantity attribute -> its norms (the time column dropped) from the demo's output."""
    attributes = {q.attribute for q in demo.available_quantities()}
    rows = [line.split() for line in out.splitlines()]
    return {r[0]: r[2:] for r in rows if r and r[0] in attributes}


def test_printed_values_do_not_depend_on_repeats_or_selection(capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--batch-size", "8", "--problems", "mlp"]
    demo.main([*common, "--repeats", "1", "--quantities", "DiagGGNMC", "BatchGrad"])
    once = _value_rows(capsys.readouterr().out)
    demo.main([*common, "--repeats", "4", "--quantities", "DiagGGNMC"])
    four = _value_rows(capsys.readouterr().out)
    assert once["diag_ggn_mc"] == four["diag_ggn_mc"]
    assert len(once["diag_ggn_mc"]) == len(list(demo.builtin_problems(2)[0].model.parameters()))


def test_builtin_problems_are_seeded_per_problem_and_leave_the_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    [cnn_alone] = demo.builtin_problems(4, [demo.ProblemName.CNN])
    _, cnn_second = demo.builtin_problems(4)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(cnn_alone.inputs, cnn_second.inputs)
    for a, b in zip(cnn_alone.model.parameters(), cnn_second.model.parameters()):
        assert torch.equal(a, b)


def test_monte_carlo_values_are_seeded() -> None:
    problem = demo.builtin_problems(batch_size=6)[0]
    quantity = [secorder_hooks.DiagGGNMC()]
    [one] = demo.run_problem(problem, quantity, repeats=1)
    [three] = demo.run_problem(problem, quantity, repeats=3)
    assert one.norms == three.norms and one.ratio > 0 and three.seconds > 0


def test_allocation_seconds_is_positive() -> None:
    assert demo.allocation_seconds(demo.builtin_problems(batch_size=4)[0], repeats=2) > 0


def test_busy_machine_is_announced(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (99.0, 99.0, 99.0), raising=False)
    demo.main(["--batch-size", "4", "--repeats", "1", "--problems", "mlp", "--quantities", "SumGradSquared"])
    assert "The machine is busy (load average 99.0 on" in capsys.readouterr().out
