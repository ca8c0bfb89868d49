r"""Exact traces of Fisher information matrices: empirical and generalized (GGN).

Each trace equals the sum of the matching diagonal of
:mod:`secorder_hooks.approximations.fisher_diagonal`, at the same scale
(:math:`L = c \sum_n \ell_n`, see :doc:`/conventions`). Nothing is estimated: the
``num_samples`` arguments exist for compatibility with stochastic (Hutchinson)
estimators and do not change the result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from secorder_hooks.engine.sync import SyncOption
from secorder_hooks.function_api.empirical import LossFn, empirical_fisher
from secorder_hooks.function_api.ggn import generalized_fisher
from secorder_hooks.function_api.validation import Inputs
from secorder_hooks.losses.kinds import LossKind

__all__ = ["empirical_fisher_trace", "generalized_fisher_trace"]


def _check_num_samples(num_samples: int) -> None:
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int (it is unused by the exact trace), got {num_samples!r}.")


def empirical_fisher_trace(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor, num_samples: int = 1, *, sync: SyncOption = None
) -> Tensor:
    r"""Exact trace of the empirical Fisher, :math:`c \sum_n \|\nabla_\theta \ell_n\|^2`.

    Computed from the per-example gradient norms of one engine backward
    (:class:`~secorder_hooks.BatchL2Grad`, which Linear layers give as
    :math:`\|g_n\|^2 \|x_n\|^2` without forming per-example gradients), divided by :math:`c`.
    Equals ``sum(d.sum() for d in empirical_fisher_diagonal(...))``.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        >>> empirical_fisher_trace(model, torch.nn.MSELoss(reduction="sum"), x, y)
        tensor(68.)

    Args:
        model: The model; dim 0 of ``inputs`` indexes the examples.
        loss_fn: One standard loss applied to the model output (see
            :func:`~secorder_hooks.approximations.fisher_diagonal.empirical_fisher_diagonal`).
        inputs: Model input ``[N, ...]``, a tuple of positional inputs, or a dict of keyword
            arguments (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``).
        targets: Targets ``[N, ...]``.
        num_samples: Accepted for compatibility; unused by the exact computation.
        sync: Data-parallel training: the result of the global batch of all processes
            (``None``: if ``model`` is a ``DistributedDataParallel``; ``True`` or a process
            group: always; ``False``: this process's batch), as for
            :func:`~secorder_hooks.core.hessian_diagonal.model_hessian_diagonal`.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: ``num_samples < 1`` and the bad inputs of ``empirical_fisher_diagonal``.
    """
    _check_num_samples(num_samples)
    return empirical_fisher(model, loss_fn, inputs, targets, trace=True, caller="empirical_fisher_trace", sync=sync)


def generalized_fisher_trace(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str | LossKind = "nll",
    num_samples: int = 1,
    create_graph: bool = False,
    *,
    reduction: str = "mean",
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
    sync: SyncOption = None,
) -> Tensor:
    r"""Exact trace of the generalized Fisher (GGN), :math:`\operatorname{tr}(c \sum_n J_n^\top H_n J_n)`.

    The sum of
    :func:`~secorder_hooks.approximations.fisher_diagonal.generalized_fisher_diagonal`
    with the same arguments (see there for ``loss_type``, ``reduction`` and the
    Monte-Carlo options).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1, bias=False)
        >>> x = torch.randn(4, 3)
        >>> trace = generalized_fisher_trace(model, model(x), torch.randn(4, 1), loss_type="mse", reduction="sum")
        >>> torch.allclose(trace, 2 * (x**2).sum())
        True

    Args:
        model: The model whose parameters produced ``outputs``.
        outputs: Model output ``[N, *f]`` with its graph.
        targets: Targets as the likelihood expects them.
        loss_type: ``"nll"`` / ``"cross_entropy"``, ``"mse"`` / ``"gaussian"``, ``"bce"`` / ``"bernoulli"``.
        num_samples: Accepted for compatibility; unused by the exact computation.
        create_graph: Make the result differentiable through the model Jacobians.
        reduction: ``"mean"`` or ``"sum"``.
        mc_samples: If given, a Monte-Carlo estimate with that many samples per example.
        generator: Random generator for the Monte-Carlo samples.
        sync: Data-parallel training: the result of the global batch of all processes
            (``None``: if ``model`` is a ``DistributedDataParallel``; ``True`` or a process
            group: always; ``False``: this process's batch), as for
            :func:`~secorder_hooks.core.hessian_diagonal.model_hessian_diagonal`.

    Returns:
        0-dim tensor.

    Raises:
        ValueError: ``num_samples < 1`` and the bad inputs of ``generalized_fisher_diagonal``.
        NotImplementedError: Unknown ``loss_type`` or unsupported shapes.
    """
    _check_num_samples(num_samples)
    caller = "generalized_fisher_trace"
    diag = generalized_fisher(
        model, outputs, targets, loss_type, create_graph, reduction, mc_samples, generator, caller, sync
    )
    return sum((d.sum() for d in diag), outputs.new_zeros(()).detach())
