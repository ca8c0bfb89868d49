r"""Curvature diagonals grouped by layer, and summary statistics per layer.

Each function runs one backward pass for the whole model (the engine computes every
layer's diagonal at once) and regroups the result: for every selected module, the
diagonals of its *own* parameters (``module.parameters(recurse=False)``), flattened and
concatenated in registration order. Scale as in :doc:`/conventions`
(:math:`L = c \sum_n \ell_n`); the blocks are the diagonal blocks of the full matrices,
i.e. the per-layer results are exactly the full results regrouped. Thin public functions
over ``secorder_hooks.function_api.per_layer``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from secorder_hooks.engine.sync import SyncOption
from secorder_hooks.function_api.per_layer import (
    FisherType,
    LayerTypes,
    LossFn,
    layer_curvature_stats,
    per_layer_fisher,
    per_layer_hessian,
)
from secorder_hooks.function_api.validation import Inputs

__all__ = ["FisherType", "per_layer_hessian_diagonal", "per_layer_fisher_diagonal", "get_layer_curvature_stats"]


def per_layer_hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    layer_types: LayerTypes = None,
    create_graph: bool = False,
    *,
    sync: SyncOption = None,
) -> dict[str, Tensor]:
    r"""Exact Hessian diagonal of the loss, grouped by layer.

    The diagonal of :math:`\partial^2 L / \partial \theta^2` from
    :func:`~secorder_hooks.core.hessian_diagonal.model_hessian_diagonal` (one engine
    backward, or the exact generic fallback), regrouped by module.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> blocks = per_layer_hessian_diagonal(model, torch.nn.CrossEntropyLoss(), x, y)
        >>> {name: tuple(d.shape) for name, d in blocks.items()}
        {'0': (15,), '2': (8,)}

    Args:
        model: The model; dim 0 of ``inputs`` indexes the examples.
        loss_fn: ``loss_fn(outputs, targets)`` returning a scalar.
        inputs: Model input ``[N, ...]``, a tuple of positional inputs, or a dict of keyword
            arguments (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``).
        targets: Targets ``[N, ...]``.
        layer_types: Module classes to report (``isinstance``); default ``(nn.Linear, nn.Conv2d)``.
        create_graph: Make the result differentiable.
        sync: Data-parallel training: the blocks of the global batch of all processes
            (``None``: if ``model`` is a ``DistributedDataParallel``, whose wrapped module's
            names key the result; ``True`` or a process group: always; ``False``: this
            process's batch), as for :func:`~secorder_hooks.core.hessian_diagonal.model_hessian_diagonal`.

    Returns:
        For each selected module with parameters, keyed by its qualified name in
        ``model.named_modules()``, a 1-D tensor: its own parameters' diagonals flattened
        and concatenated in registration order (zeros for parameters that do not require
        grad).
    """
    return per_layer_hessian(model, loss_fn, inputs, targets, layer_types, create_graph, sync)


def per_layer_fisher_diagonal(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    layer_types: LayerTypes = None,
    create_graph: bool = False,
    fisher_type: str | FisherType = "empirical",
    *,
    mc_samples: int = 1,
    generator: torch.Generator | None = None,
    sync: SyncOption = None,
) -> dict[str, Tensor]:
    r"""Fisher diagonal of the loss, grouped by layer.

    ``fisher_type``:

    * ``"empirical"``: :math:`c \sum_n \nabla \ell_n \odot \nabla \ell_n`
      (as :func:`~secorder_hooks.approximations.fisher_diagonal.empirical_fisher_diagonal`);
    * ``"exact"`` (alias ``"ggn"``): the generalized Fisher :math:`c \sum_n J_n^\top H_n J_n`
      with :math:`H_n` the Hessian of the loss as written in ``loss_fn``;
    * ``"mc"``: its unbiased Monte-Carlo estimate with ``mc_samples`` targets per example
      drawn from the model's predictive distribution.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
        >>> x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
        >>> blocks = per_layer_fisher_diagonal(model, torch.nn.CrossEntropyLoss(), x, y, fisher_type="exact")
        >>> sorted(blocks), bool(all((d >= 0).all() for d in blocks.values()))
        (['0', '2'], True)

    Args:
        model: The model; dim 0 of ``inputs`` indexes the examples.
        loss_fn: One standard loss (``"empirical"``, ``"mc"``) or any loss summing over
            examples (``"exact"``) applied to the model output.
        inputs: Model input ``[N, ...]``, a tuple of positional inputs, or a dict of keyword
            arguments (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``).
        targets: Targets ``[N, ...]``.
        layer_types: Module classes to report (``isinstance``); default ``(nn.Linear, nn.Conv2d)``.
        create_graph: Make the result differentiable (generic path).
        fisher_type: ``"empirical"``, ``"exact"`` or ``"mc"``.
        mc_samples: Samples per example for ``"mc"``.
        generator: Random generator for ``"mc"``.
        sync: Data-parallel training: the blocks of the global batch of all processes
            (``None``: if ``model`` is a ``DistributedDataParallel``, whose wrapped module's
            names key the result; ``True`` or a process group: always; ``False``: this
            process's batch), as for :func:`~secorder_hooks.core.hessian_diagonal.model_hessian_diagonal`.

    Returns:
        As :func:`per_layer_hessian_diagonal`.

    Raises:
        ValueError: Unknown ``fisher_type`` and the bad inputs of the underlying functions.
    """
    return per_layer_fisher(
        model, loss_fn, inputs, targets, layer_types, create_graph, fisher_type, mc_samples, generator, sync
    )


def get_layer_curvature_stats(layer_curvatures: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    r"""Summary statistics of each layer's curvature diagonal.

    Example:
        >>> import torch
        >>> stats = get_layer_curvature_stats({"fc": torch.tensor([1.0, -2.0, 3.0, 4.0])})
        >>> stats["fc"]["mean"], stats["fc"]["min"], stats["fc"]["frac_negative"]
        (1.5, -2.0, 0.25)

    Args:
        layer_curvatures: Layer name to tensor (any shape; all its entries are used).

    Returns:
        Per layer: ``mean``, ``std``, ``max``, ``min``,
        ``abs_mean``, ``abs_max``, ``median``, ``norm`` (Euclidean), ``sum`` (the layer's
        trace), ``numel``, ``frac_negative`` and ``frac_zero`` (fractions of entries below /
        equal to 0; negative Hessian entries signal non-convex directions). ``std`` is the
        sample standard deviation with Bessel's correction, as ``tensor.std()`` and
        torch-secorder's ``get_layer_curvature_stats`` give it:
        :math:`\sqrt{\sum_i (v_i - \bar v)^2 / (n - 1)}` over the ``n`` entries; for a single
        entry it is undefined and reported as ``nan`` (as ``tensor.std()`` returns, without
        its warning).

    Raises:
        ValueError: A layer's tensor is empty.
        TypeError: A value is not a tensor.
    """
    return layer_curvature_stats(layer_curvatures)
