r"""Curvature diagonals grouped by layer, and summary statistics per layer.

Each function runs one backward pass for the whole model (the engine computes every
layer's diagonal at once) and regroups the result: for every selected module, the
diagonals of its *own* parameters (``module.parameters(recurse=False)``), flattened and
concatenated in registration order. Scale as in :doc:`/conventions`
(:math:`L = c \sum_n \ell_n`); the blocks are the diagonal blocks of the full matrices,
i.e. the per-layer results are exactly the full results regrouped.
"""

from __future__ import annotations

import enum
import math
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from secorder_hooks.core._fallback import ENGINE_ERRORS, Backend, FallbackWarning, current_backend, engine_supports
from secorder_hooks.core._fallback import logger as _logger
from secorder_hooks.core._sync import synchronized, unwrap
from secorder_hooks.core._validation import Inputs, ModelInputs, check_batch
from secorder_hooks.core.hessian_diagonal import model_hessian_diagonal
from secorder_hooks.engine.sync import SyncOption, sync_group

__all__ = ["FisherType", "per_layer_hessian_diagonal", "per_layer_fisher_diagonal", "get_layer_curvature_stats"]

LossFn = Callable[[Tensor, Tensor], Tensor]
LayerTypes = type | Iterable[type] | None

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


class FisherType(enum.Enum):
    """Which Fisher :func:`per_layer_fisher_diagonal` computes."""

    EMPIRICAL = "empirical"
    r"""Empirical Fisher :math:`c \sum_n \nabla \ell_n \nabla \ell_n^\top`."""
    EXACT = "exact"
    r"""Generalized Fisher (GGN) :math:`c \sum_n J_n^\top H_n J_n` (the true Fisher for the standard losses)."""
    MC = "mc"
    """Unbiased Monte-Carlo estimate of the GGN, targets sampled from the model."""

    @classmethod
    def parse(cls, value: str | FisherType) -> FisherType:
        """The Fisher type named ``value`` (case-insensitive; ``"ggn"`` is an alias of ``"exact"``).

        Raises:
            ValueError: Unknown name (lists the accepted ones).
        """
        if isinstance(value, FisherType):
            return value
        key = str(value).strip().lower()
        key = {"ggn": "exact", "generalized": "exact", "monte_carlo": "mc"}.get(key, key)
        try:
            return cls(key)
        except ValueError:
            accepted = ", ".join(repr(t.value) for t in cls)
            raise ValueError(f"unknown fisher_type {value!r}; accepted: {accepted} (and 'ggn').") from None


def _select_layers(model: nn.Module, layer_types: LayerTypes) -> list[tuple[str, nn.Module]]:
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


def _regroup(model: nn.Module, layers: list[tuple[str, nn.Module]], diag: list[Tensor]) -> dict[str, Tensor]:
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return {
        name: torch.cat([diag[index[id(p)]].reshape(-1) for p in module.parameters(recurse=False)])
        for name, module in layers
    }


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
    group = sync_group(model, sync, "per_layer_hessian_diagonal") or False  # resolved once, on the wrapper
    model = unwrap(model)
    check_batch(model, inputs, targets)
    layers = _select_layers(model, layer_types)
    if not layers:
        return {}
    diag = model_hessian_diagonal(model, loss_fn, inputs, targets, create_graph=create_graph, sync=group)
    return _regroup(model, layers, diag)


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
    kind = FisherType.parse(fisher_type)
    caller = "per_layer_fisher_diagonal"
    group = sync_group(model, sync, caller) or False  # resolved once, on the wrapper
    model = unwrap(model)
    args = check_batch(model, inputs, targets)
    layers = _select_layers(model, layer_types)
    if not layers:
        return {}
    if kind is FisherType.EMPIRICAL:
        from secorder_hooks.approximations._empirical import empirical_fisher

        diag = empirical_fisher(
            model, loss_fn, inputs, targets, trace=False, create_graph=create_graph, caller=caller, sync=group
        )
    else:

        def compute(model: nn.Module, loss_fn: LossFn) -> list[Tensor]:
            return _ggn_for_loss(model, loss_fn, args, targets, kind, create_graph, mc_samples, generator)

        diag = synchronized(caller, model, loss_fn, group, compute, create_graph)
    return _regroup(model, layers, diag)


def _ggn_for_loss(
    model: nn.Module,
    loss_fn: LossFn,
    args: ModelInputs,
    targets: Tensor,
    kind: FisherType,
    create_graph: bool,
    mc_samples: int,
    generator: torch.Generator | None,
) -> list[Tensor]:
    from secorder_hooks.quantities import DiagGGNExact, DiagGGNMC

    quantity = DiagGGNExact() if kind is FisherType.EXACT else DiagGGNMC(mc_samples, generator)
    params = list(model.parameters())
    if not create_graph and engine_supports(second_order=True):
        from secorder_hooks.core._engine import run_engine

        try:
            found = run_engine(model, loss_fn, args, targets, params, [quantity]).values[quantity.attribute]
            return [torch.zeros_like(p).detach() if v is None else v for v, p in zip(found, params)]
        except ENGINE_ERRORS as err:
            if current_backend() is Backend.ENGINE:
                raise
            warnings.warn(
                FallbackWarning(
                    f"per_layer_fisher_diagonal: the engine declined ({type(err).__name__}: {err}); "
                    "using the generic path."
                ),
                stacklevel=5,
            )
    _logger.debug("per_layer_fisher_diagonal: generic path")
    from secorder_hooks.core._generic_ggn import generic_ggn_for_loss

    return generic_ggn_for_loss(model, loss_fn, args, targets, params, create_graph, kind is FisherType.MC, quantity)


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
