"""Misuse of extend() raises the package's errors and leaves no trace on the model."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from secorder_hooks import (
    BatchGrad,
    BatchL2Grad,
    ExtensionError,
    SumGradSquared,
    UnsupportedModuleError,
    Variance,
    extend,
)
from tests.support import zoo
from tests.support.checks import hook_counts, live_tensors

FIRST_ORDER = (BatchGrad(), SumGradSquared(), BatchL2Grad(), Variance())


def loss_of(case: zoo.Case) -> Tensor:
    return case.loss_fn()(case.model(case.x), case.y)


def test_batchnorm_in_train_mode_is_rejected() -> None:
    case = zoo.make("resnet_block", torch.float64)
    case.model.train()
    match = r"BatchNorm2d 'block\.bn1'.*eval\(\).*GroupNorm"
    with pytest.raises(UnsupportedModuleError, match=match), extend(case.model, BatchGrad()):
        loss_of(case).backward()


def test_batchnorm_in_eval_mode_is_accepted() -> None:
    case = zoo.make("resnet_block", torch.float64)
    with extend(case.model, BatchGrad()):
        loss_of(case).backward()
    assert case.model.block.bn1.weight.grad_batch.shape == (zoo.N, 3)


def test_model_without_trainable_parameters() -> None:
    model = nn.Sequential(nn.Linear(3, 2), nn.ReLU()).requires_grad_(False)
    with pytest.raises(ExtensionError, match="without trainable parameters"), extend(model, BatchGrad()):
        pass
    assert hook_counts(model) == hook_counts(nn.Sequential(nn.Linear(3, 2), nn.ReLU()))


def test_graph_built_outside_the_context() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    loss = loss_of(case)
    with pytest.raises(ExtensionError, match=r"outside|no forward pass"), extend(case.model, BatchGrad()):
        loss.backward()


def test_graph_built_outside_with_another_forward_inside() -> None:
    case = zoo.make("mlp_tanh", torch.float64)
    loss = loss_of(case)
    with pytest.raises(ExtensionError, match="outside"), extend(case.model, BatchGrad()):
        case.model(case.x)  # recorded, but not part of `loss`
        loss.backward()


class TiedFunctionally(nn.Module):
    """The parent reuses a child's weight through F.linear: invisible to per-module rules."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.enc(x)), self.enc.weight.T)


def test_parameter_used_outside_its_module() -> None:
    model = TiedFunctionally().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ExtensionError, match=r"'enc\.weight'.*outside"), extend(model, BatchGrad()):
        model(x).square().sum().backward()


class SplitTied(nn.Module):
    """The parent splits a child's weight (an op returning a tuple) and uses a piece."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        top, _ = self.lin.weight.split(2)
        return F.linear(torch.tanh(self.lin(x)), top)


def test_parameter_used_outside_its_module_through_a_tuple_returning_op() -> None:
    model = SplitTied().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    with pytest.raises(ExtensionError, match=r"'lin\.weight'.*outside"), extend(model, BatchGrad()):
        model(x).square().sum().backward()


def test_weight_penalty_added_to_the_loss() -> None:
    case = zoo.make("mlp_relu", torch.float64)
    with pytest.raises(ExtensionError, match=r"'0\.weight'.*penalty"), extend(case.model, SumGradSquared()):
        (loss_of(case) + 1e-3 * case.model[0].weight.square().sum()).backward()


def test_penalty_outside_the_backward_is_fine() -> None:
    """A parameter read in the block but not reaching the loss is no error (e.g. logging a norm)."""
    case = zoo.make("mlp_relu", torch.float64)
    with extend(case.model, BatchGrad()):
        case.model[0].weight.norm()
        loss_of(case).backward()
    assert case.model[0].weight.grad_batch.shape[0] == zoo.N


@pytest.mark.parametrize("where", ["forward", "backward", "after"])
def test_exception_inside_the_block_removes_every_trace(where: str) -> None:
    case = zoo.make("resnet_block", torch.float64)
    before = hook_counts(case.model)
    x = case.x.clone()
    x_ref = weakref.ref(x)
    out_ref = None
    with pytest.raises(RuntimeError, match="boom"), extend(case.model, *FIRST_ORDER):
        out = case.model(x)
        out_ref = weakref.ref(out)
        if where == "backward":
            case.loss_fn()(out, case.y).backward()
        elif where == "after":
            case.loss_fn()(out, case.y).backward()
            case.model(x)  # recorded, never backpropagated
        raise RuntimeError("boom")
    assert hook_counts(case.model) == before
    assert not torch.overrides._get_current_function_mode_stack()
    del out, x
    gc.collect()
    assert x_ref() is None, "the engine still holds the input batch"
    assert out_ref() is None, "the engine still holds the model output"
    # the model still works normally and a new context works
    case.loss_fn()(case.model(case.x), case.y).backward()
    case.model.zero_grad()  # the plain backward's .grad: a new accumulation
    with extend(case.model, BatchGrad()):
        loss_of(case).backward()


def test_normal_exit_removes_every_trace() -> None:
    case = zoo.make("called_twice", torch.float64)
    before = hook_counts(case.model)
    x = case.x.clone()
    x_ref = weakref.ref(x)
    with extend(case.model, *FIRST_ORDER):
        case.loss_fn()(case.model(x), case.y).backward()
    assert hook_counts(case.model) == before
    del x
    gc.collect()
    assert x_ref() is None


@pytest.mark.parametrize("name", ["called_twice", "mha_batch_first_False"])
def test_memory_is_flat_over_iterations(name: str) -> None:
    case = zoo.make(name, torch.float64)
    opt = torch.optim.SGD(case.model.parameters(), lr=1e-3)
    with extend(case.model, *FIRST_ORDER):

        def step() -> None:
            opt.zero_grad()
            loss_of(case).backward()
            opt.step()

        for _ in range(3):
            step()
        start = live_tensors()
        for _ in range(50):
            step()
        end = live_tensors()
    assert end <= start, f"{end - start} tensors leaked over 50 iterations"


def test_a_step_leaves_no_cyclic_garbage() -> None:
    """The session is freed by reference counting on exit: no work left for the garbage collector."""
    case = zoo.make("mlp_relu", torch.float64)
    enabled = gc.isenabled()
    gc.disable()
    try:
        with extend(case.model, *FIRST_ORDER) as session:
            loss_of(case).backward()
        session_ref = weakref.ref(session)
        del session
        assert session_ref() is None, "the session is kept alive by a reference cycle"
    finally:
        if enabled:
            gc.enable()
