r"""Curvature diagonals grouped by layer, and summary statistics per layer.

The implementations behind :mod:`secorder_hooks.core.per_layer_curvature`: the full
diagonal (one engine pass, :mod:`secorder_hooks.function_api.hessian`,
:mod:`~secorder_hooks.function_api.empirical`, :mod:`~secorder_hooks.function_api.ggn`)
regrouped by module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from secorder_hooks.engine.sync import SyncOption, sync_group
from secorder_hooks.enums import ChoiceEnum
from secorder_hooks.function_api.empirical import empirical_fisher
from secorder_hooks.function_api.ggn import ggn_of_loss
from secorder_hooks.function_api.hessian import hessian_diagonal_of_model
from secorder_hooks.function_api.sync import synchronized, unwrap
from secorder_hooks.function_api.validation import Inputs, check_batch

__all__ = [
    "FisherType",
    "LayerTypes",
    "per_layer_fisher",
    "per_layer_hessian",
    "layer_curvature_stats",
    "regroup",
    "select_layers",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
LayerTypes = type | Iterable[type] | None

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class FisherType(ChoiceEnum):
    """Which Fisher :func:`per_layer_fisher_diagonal` computes."""

    EMPIRICAL = "empirical"
    r"""Empirical Fisher :math:`c \sum_n \nabla \ell_n \nabla \ell_n^\top`."""
    EXACT = "exact"
    r"""Generalized Fisher (GGN) :math:`c \sum_n J_n^\top H_n J_n` (the true Fisher for the standard losses)."""
    MC = "mc"
    """Unbiased Monte-Carlo estimate of the GGN, targets sampled from the model."""

    @classmethod
    def aliases(cls) -> dict[str, FisherType]:
        """``"ggn"`` and ``"generalized"`` for :attr:`EXACT`, ``"monte_carlo"`` for :attr:`MC`."""
        return {"ggn": cls.EXACT, "generalized": cls.EXACT, "monte_carlo": cls.MC}


def select_layers(model: nn.Module, layer_types: LayerTypes) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules of ``model`` of ``layer_types`` (default Linear, Conv2d) with own parameters.

    Raises:
        TypeError: ``layer_types`` holds something other than ``nn.Module`` subclasses.
    """
    if layer_types is None:
        types: tuple[type, ...] = DEFAULT_LAYER_TYPES
    elif isinstance(layer_types, type):
        types = (layer_types,)
    else:
        types = tuple(layer_types)
    bad = [t for t in types if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise TypeError(f"layer_types must be nn.Module subclasses, got {bad!r}.")
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types) and any(True for _ in m.parameters(recurse=False))
    ]


def regroup(model: nn.Module, layers: list[tuple[str, nn.Module]], diag: list[Tensor]) -> dict[str, Tensor]:
    """Per layer, its own parameters' entries of ``diag`` (aligned with ``model.parameters()``), flattened."""
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return {
        name: torch.cat([diag[index[id(p)]].reshape(-1) for p in module.parameters(recurse=False)])
        for name, module in layers
    }


def per_layer_hessian(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    layer_types: LayerTypes,
    create_graph: bool,
    sync: SyncOption,
) -> dict[str, Tensor]:
    """:func:`secorder_hooks.core.per_layer_curvature.per_layer_hessian_diagonal` (see there)."""
    group = sync_group(model, sync, "per_layer_hessian_diagonal") or False  # resolved once, on the wrapper
    model = unwrap(model)
    check_batch(model, inputs, targets)
    layers = select_layers(model, layer_types)
    if not layers:
        return {}
    diag = hessian_diagonal_of_model(model, loss_fn, inputs, targets, create_graph, False, group)
    return regroup(model, layers, diag)


def per_layer_fisher(
    model: nn.Module,
    loss_fn: LossFn,
    inputs: Inputs,
    targets: Tensor,
    layer_types: LayerTypes,
    create_graph: bool,
    fisher_type: str | FisherType,
    mc_samples: int,
    generator: torch.Generator | None,
    sync: SyncOption,
) -> dict[str, Tensor]:
    """:func:`secorder_hooks.core.per_layer_curvature.per_layer_fisher_diagonal` (see there)."""
    kind = FisherType.parse(fisher_type, "fisher_type")
    caller = "per_layer_fisher_diagonal"
    group = sync_group(model, sync, caller) or False  # resolved once, on the wrapper
    model = unwrap(model)
    args = check_batch(model, inputs, targets)
    layers = select_layers(model, layer_types)
    if not layers:
        return {}
    if kind is FisherType.EMPIRICAL:
        diag = empirical_fisher(
            model, loss_fn, inputs, targets, trace=False, create_graph=create_graph, caller=caller, sync=group
        )
    else:
        samples = mc_samples if kind is FisherType.MC else None

        def compute(model: nn.Module, loss_fn: LossFn) -> list[Tensor]:
            return ggn_of_loss(model, loss_fn, args, targets, create_graph, samples, generator, caller)

        diag = synchronized(caller, model, loss_fn, group, compute, create_graph)
    return regroup(model, layers, diag)


def layer_curvature_stats(layer_curvatures: Mapping[str, Tensor]) -> dict[str, dict[str, float]]:
    """:func:`secorder_hooks.core.per_layer_curvature.get_layer_curvature_stats` (see there)."""
    stats: dict[str, dict[str, float]] = {}
    for name, values in layer_curvatures.items():
        if not isinstance(values, Tensor):
            raise TypeError(f"layer {name!r}: expected a tensor, got {type(values).__name__}.")
        if values.numel() == 0:
            raise ValueError(f"layer {name!r} has an empty curvature tensor; statistics are undefined.")
        v = values.detach().reshape(-1).to(torch.float64 if not values.is_floating_point() else values.dtype)
        n = v.numel()
        stats[name] = {
            "mean": v.mean().item(),
            "std": v.std().item() if n > 1 else math.nan,
            "max": v.max().item(),
            "min": v.min().item(),
            "abs_mean": v.abs().mean().item(),
            "abs_max": v.abs().max().item(),
            "median": v.median().item(),
            "norm": math.sqrt((v.double() ** 2).sum().item()),
            "sum": v.sum().item(),
            "numel": float(n),
            "frac_negative": (v < 0).sum().item() / n,
            "frac_zero": (v == 0).sum().item() / n,
        }
    return stats
