"""Losses on functions of the model outputs whose rows are not the examples (issues 17, 18).

The loss input ``f`` is some function ``g`` of the outputs of one or more forward calls:
a concatenation of two calls or of one output with itself, a subset or permutation of
rows, a time-major reshape of a sequence output, a reshape that splits each example's
row into several loss rows or merges rows of different examples, an operation the
engine cannot trace, and sums of losses of one output. Every quantity is compared in
float64 with brute force that knows nothing of rows or examples:

* DiagGGNExact: ``diag(J^T H J)`` with ``J`` the Jacobian of ``f`` in the parameters
  and ``H`` the Hessian of the loss in ``f`` (``torch.func``);
* DiagHessian: ``torch.func.hessian`` of the batch loss;
* BatchDiagGGNExact / BatchDiagHessian: the same for example ``n``'s term, with only
  example ``n`` of every forward call seeing the parameters (``torch.where`` masking);
  example ``n`` of a second forward call is the same example, as for ``BatchGrad``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

import secorder_hooks as sh

N, C, T = 4, 3, 2
DTYPE = torch.float64
Outputs = list[Tensor]


@dataclass
class Case:
    """``loss = h(g(outputs), reduction)`` for ``outputs = [model(x) for x in inputs]``.

    Attributes:
        name: Test id.
        model: A float64 model.
        inputs: One input batch per forward call.
        g: The loss input as a function of the outputs.
        h: The loss as a function of the loss input and the reduction.
        couples: Rows of ``g(outputs)`` depend on several examples (per-example quantities raise).
    """

    name: str
    model: nn.Module
    inputs: tuple[Tensor, ...]
    g: Callable[[Outputs], Tensor]
    h: Callable[[Tensor, str], Tensor]
    couples: bool = False


def _mlp(out: int = C) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 6), nn.Sigmoid(), nn.Linear(6, out)).to(DTYPE)


class _GRU(nn.Module):
    """A GRU (batch first) and a linear head; returns the sequence output or the last hidden state ``h[-1]``.

    ``h`` is ``[layers, N, H]``: its examples are on dim 1 (the GRU's batch layout).
    """

    def __init__(self, hidden_state: bool) -> None:
        super().__init__()
        self.rnn, self.hidden_state = nn.GRU(4, 3, batch_first=True), hidden_state

    def forward(self, x: Tensor) -> Tensor:
        out, h = self.rnn(x)
        return h[-1] if self.hidden_state else out


def _x(*shape: int) -> Tensor:
    return torch.randn(*shape, 4, dtype=DTYPE)


def _ce(rows: int, classes: int = C, **kwargs) -> Callable[[Tensor, str], Tensor]:
    y = torch.randint(0, classes, (rows,))
    return lambda f, reduction: F.cross_entropy(f, y, reduction=reduction, **kwargs)


def _mse(shape: tuple[int, ...]) -> Callable[[Tensor, str], Tensor]:
    y = torch.randn(shape, dtype=DTYPE)
    return lambda f, reduction: F.mse_loss(f, y, reduction=reduction)


def _indefinite(rows: int) -> Callable[[Tensor, str], Tensor]:
    """A loss the engine does not recognize whose Hessian blocks are definite of a sign that varies by row.

    The column weights (signs) must follow the rows to their examples.
    """
    ce = _ce(rows)
    signs = torch.where(torch.arange(rows) % 3 == 1, -1.0, 1.0).to(DTYPE)[:, None]
    return lambda f, reduction: 2 * ce(f, reduction) + 0.5 * (signs * f.square()).sum() + 0.1 * (f**3).sum()


def _cases() -> list[Case]:
    perm = torch.tensor([2, 0, 3, 1])
    return [
        Case("cat_two_calls", _mlp(), (_x(N), _x(N)), lambda o: torch.cat([o[0], o[1]]), _ce(2 * N)),
        Case("cat_same_output", _mlp(), (_x(N),), lambda o: torch.cat([o[0], o[0]]), _ce(2 * N)),
        Case("stack_two_calls", _mlp(), (_x(N), _x(N)), lambda o: torch.stack(o, 1).flatten(0, 1), _ce(2 * N)),
        Case(
            "cat_constant_rows",
            _mlp(),
            (_x(N),),
            lambda o: torch.cat([o[0], torch.ones(2, C, dtype=DTYPE)]),
            _ce(N + 2),
        ),
        Case("first_rows", _mlp(), (_x(N),), lambda o: o[0][:3], _ce(3)),
        Case("every_other_row", _mlp(), (_x(N),), lambda o: o[0][::2], _mse((N // 2, C))),
        Case("permuted_rows", _mlp(), (_x(N),), lambda o: o[0][perm], _indefinite(N)),
        Case("flipped_rows", _mlp(), (_x(N),), lambda o: o[0].flip(0), _indefinite(N)),
        Case("repeated_rows", _mlp(), (_x(N),), lambda o: o[0][torch.tensor([0, 2, 0, 1, 2])], _ce(5)),
        Case("time_major", _mlp(), (_x(N, T),), lambda o: o[0].transpose(0, 1).reshape(-1, C), _ce(T * N)),
        Case(
            "time_major_permute",
            _mlp(),
            (_x(N, T),),
            lambda o: o[0].permute(1, 0, 2).reshape(-1, C),
            _indefinite(T * N),
        ),
        Case("batch_major", _mlp(), (_x(N, T),), lambda o: o[0].reshape(-1, C), _ce(T * N)),
        Case("split_rows", _mlp(2 * C), (_x(N),), lambda o: o[0].reshape(-1, C), _ce(2 * N)),
        Case("split_rows_view", _mlp(2 * C), (_x(N),), lambda o: o[0].view(N, 2, C).flatten(0, 1), _mse((2 * N, C))),
        Case("split_two_calls", _mlp(2 * C), (_x(N), _x(N)), lambda o: torch.cat(o).reshape(-1, C), _ce(4 * N)),
        Case("merge_rows", _mlp(), (_x(N),), lambda o: o[0].reshape(N // 2, 2 * C), _ce(N // 2, 2 * C), True),
        Case("merge_all_rows", _mlp(), (_x(N),), lambda o: o[0].view(-1)[None], _ce(1, N * C), True),
        Case("merge_rows_mse", _mlp(), (_x(N),), lambda o: o[0].reshape(N // 2, 2 * C), _mse((N // 2, 2 * C)), True),
        Case("negative_slice", _mlp(), (_x(N),), lambda o: o[0][-3:], _ce(3)),
        Case("sequence_last_step", _mlp(), (_x(N, T),), lambda o: o[0][:, -1], _indefinite(N)),
        Case("gru_hidden_state", _GRU(True).to(DTYPE), (_x(N, T),), lambda o: o[0], _ce(N)),
        Case(
            "gru_time_major",
            _GRU(False).to(DTYPE),
            (_x(N, T),),
            lambda o: o[0].transpose(0, 1).flatten(0, 1),
            _ce(T * N),
        ),
        # operations the graph walk does not know: the rows are probed numerically
        Case("untraced_within_rows", _mlp(), (_x(N),), lambda o: o[0].cumsum(1), _ce(N)),
        Case("untraced_then_flip", _mlp(), (_x(N),), lambda o: o[0].cumsum(1).flip(0), _indefinite(N)),
        Case(
            "untraced_across_rows",
            _mlp(),
            (_x(N),),
            lambda o: o[0].reshape(N // 2, 2 * C).cumsum(1),
            _ce(N // 2, 2 * C),
            True,
        ),
        # curved operations between the model output and the loss input, on rows that are the examples
        Case(
            "curved_before_cat",
            _mlp(),
            (_x(N), _x(N)),
            lambda o: torch.cat([torch.tanh(o[0]), torch.sigmoid(o[1])]),
            _mse((2 * N, C)),
        ),
    ]


def _sum_of_losses() -> list[Case]:
    ce, ce2 = _ce(N), _ce(N)
    target = torch.softmax(torch.randn(N, C, dtype=DTYPE), 1)
    return [
        Case("ce_plus_square", _mlp(), (_x(N),), lambda o: o[0], lambda f, r: ce(f, r) + 0.5 * f.square().mean()),
        Case(
            "ce_plus_mse",
            _mlp(),
            (_x(N),),
            lambda o: o[0],
            lambda f, r: ce(f, r) + F.mse_loss(f, torch.zeros_like(f), reduction=r),
        ),
        Case(
            "ce_plus_mse_of_softmax",  # two loss calls on different functions of the output
            _mlp(),
            (_x(N),),
            lambda o: o[0],
            lambda f, r: ce(f, r) + 0.7 * F.mse_loss(torch.softmax(f, 1), target, reduction=r),
        ),
        Case(
            "ce_plus_smoothing",
            _mlp(),
            (_x(N),),
            lambda o: o[0],
            lambda f, r: 0.9 * ce2(f, r) - 0.1 * torch.log_softmax(f, 1).mean(1).mean(),
        ),
    ]


CASES = {case.name: case for case in _cases() + _sum_of_losses()}


def _outputs(case: Case, params: dict[str, Tensor], example: int | None = None) -> Outputs:
    """The outputs of every forward call; with ``example``, only that example sees ``params``."""
    outs = [functional_call(case.model, params, (x,)) for x in case.inputs]
    if example is None:
        return outs
    fixed = [case.model(x).detach() for x in case.inputs]
    mask = lambda o: (torch.arange(o.shape[0]) == example).reshape(-1, *([1] * (o.dim() - 1)))  # noqa: E731
    return [torch.where(mask(o), o, f) for o, f in zip(outs, fixed)]


def _ggn(case: Case, reduction: str, example: int | None = None) -> dict[str, Tensor]:
    params = {k: p.detach() for k, p in case.model.named_parameters()}
    f = case.g(_outputs(case, params)).detach()
    jac = jacrev(lambda p: case.g(_outputs(case, p, example)))(params)
    h = hessian(lambda f: case.h(f, reduction))(f).reshape(f.numel(), f.numel())
    result = {}
    for name, v in params.items():
        j = jac[name].reshape(f.numel(), v.numel())
        result[name] = torch.einsum("kp,kl,lp->p", j, h, j).reshape(v.shape)
    return result


def _hessian(case: Case, reduction: str, example: int | None = None) -> dict[str, Tensor]:
    params = {k: p.detach() for k, p in case.model.named_parameters()}
    h = hessian(lambda p: case.h(case.g(_outputs(case, p, example)), reduction))(params)
    return {k: h[k][k].reshape(v.numel(), v.numel()).diagonal().reshape(v.shape) for k, v in params.items()}


def _per_example(reference: Callable[..., dict[str, Tensor]], case: Case, reduction: str) -> dict[str, Tensor]:
    terms = [reference(case, reduction, n) for n in range(case.inputs[0].shape[0])]
    return {k: torch.stack([t[k] for t in terms]) for k in terms[0]}


def _run(case: Case, reduction: str, *quantities: sh.Quantity) -> None:
    case.model.zero_grad()  # a new accumulation: every test sees one backward pass
    with sh.extend(case.model, *quantities):
        loss = case.h(case.g([case.model(x) for x in case.inputs]), reduction)
        loss.backward()


def _assert_close(case: Case, attribute: str, expected: dict[str, Tensor]) -> None:
    for name, p in case.model.named_parameters():
        torch.testing.assert_close(getattr(p, attribute), expected[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(CASES))
def test_ggn(name: str, reduction: str) -> None:
    case = CASES[name]
    total = _ggn(case, reduction)
    if case.couples:
        _run(case, reduction, sh.DiagGGNExact())
        with pytest.raises(sh.UnsupportedLossError, match="several examples"):
            _run(case, reduction, sh.BatchDiagGGNExact())
    else:
        _run(case, reduction, sh.DiagGGNExact(), sh.BatchDiagGGNExact())
        per_example = _per_example(_ggn, case, reduction)
        for k in total:  # the reference's own check: the example terms add up to the GGN
            torch.testing.assert_close(per_example[k].sum(0), total[k], rtol=1e-9, atol=1e-12)
        _assert_close(case, "diag_ggn_exact_batch", per_example)
    _assert_close(case, "diag_ggn_exact", total)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(CASES))
def test_hessian(name: str, reduction: str) -> None:
    case = CASES[name]
    if case.couples:
        _run(case, reduction, sh.DiagHessian())
    else:
        _run(case, reduction, sh.DiagHessian(), sh.BatchDiagHessian())
        _assert_close(case, "diag_h_batch", _per_example(_hessian, case, reduction))
    _assert_close(case, "diag_h", _hessian(case, reduction))


REFUSED = {
    "curved_after_cat": (lambda o: torch.sigmoid(torch.cat([o[0], o[1]])), 2),
    "curved_after_flip": (lambda o: torch.sigmoid(o[0].flip(0)), 1),
    "curved_after_untraced": (lambda o: torch.sigmoid(o[0].cumsum(1)), 1),
}


@pytest.mark.parametrize("name", list(REFUSED))
def test_hessian_refuses_curved_operation_on_rearranged_rows(name: str) -> None:
    g, calls = REFUSED[name]
    case = Case(name, _mlp(), tuple(_x(N) for _ in range(calls)), g, _mse((calls * N, C)))
    with pytest.raises(sh.UnsupportedOperationError, match=r"SigmoidBackward0.*rows are not known to be the examples"):
        _run(case, "mean", sh.DiagHessian())
    _run(case, "mean", sh.DiagGGNExact())  # the GGN does not need the second-order term
    _assert_close(case, "diag_ggn_exact", _ggn(case, "mean"))


@pytest.mark.parametrize("name", ["cat_two_calls", "split_rows", "merge_rows"])
def test_monte_carlo_fisher_in_expectation(name: str) -> None:
    """The sampled columns follow the rows to their examples like the exact ones."""
    case = CASES[name]
    _run(case, "mean", sh.DiagGGNMC(mc_samples=20000, generator=torch.Generator().manual_seed(0)))
    expected = _ggn(case, "mean")
    for name_, p in case.model.named_parameters():
        torch.testing.assert_close(
            p.diag_ggn_mc, expected[name_], rtol=0.1, atol=1e-3 * float(expected[name_].abs().max())
        )


def test_standard_output_takes_the_fast_path() -> None:
    """The loss on a layer output: no change to the columns (no splitting, no probing)."""
    from secorder_hooks.engine.rows import row_map

    model = _mlp()
    with sh.extend(model, sh.DiagGGNExact()) as _:
        out = model(_x(N))
        session = _active_session()
        rows = row_map(torch.autograd.graph.get_gradient_edge(out), out.shape, list(session.records))
        out.sum().backward()
    assert rows.identity and rows.example_units is None and rows.batch_size == N


def _active_session():
    from secorder_hooks.engine.curvature import _active_session

    return _active_session()


def test_separate_losses_of_two_forward_calls_raise() -> None:
    """Curvature is taken with respect to one loss input: the error says to concatenate."""
    model, x1, x2 = _mlp(), _x(N), _x(N)
    ce1, ce2 = _ce(N), _ce(N)
    with pytest.raises(sh.UnsupportedLossError, match="concatenation"), sh.extend(model, sh.DiagGGNExact()):
        (ce1(model(x1), "mean") + ce2(model(x2), "mean")).backward()


def test_probes_in_several_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The numerical probing of untraced operations gives the same rows when split into batches of one row."""
    from secorder_hooks.engine import rows

    case = CASES["untraced_then_flip"]
    monkeypatch.setattr(rows, "PROBE_ELEMENTS", 1)
    _run(case, "sum", sh.DiagGGNExact(), sh.BatchDiagGGNExact())
    _assert_close(case, "diag_ggn_exact", _ggn(case, "sum"))
    _assert_close(case, "diag_ggn_exact_batch", _per_example(_ggn, case, "sum"))


def test_units_link_examples_through_chains_of_rows() -> None:
    """Rows linking 3-2, 2-1, 1-0 make one unit of examples 0..3; unreferenced example 4 gets its own."""
    from secorder_hooks.engine.rows import _units

    ids = torch.tensor([[3, 2], [5, -1], [2, 1], [1, 0], [-1, -1]])
    units, example_units = _units(ids, 6)
    assert example_units is not None
    assert len(set(example_units[:4].tolist())) == 1
    assert len(set(example_units.tolist())) == 3
    assert units.tolist() == [example_units[0], example_units[5], example_units[0], example_units[0], -1]
