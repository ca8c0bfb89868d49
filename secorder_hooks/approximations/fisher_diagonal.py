r"""Diagonals of Fisher information matrices: empirical and generalized (GGN).

Scale (see :doc:`/conventions`): with :math:`L = c \sum_n \ell_n(f_n)` the loss as
computed (:math:`c = 1` for ``"sum"``, one over the number of averaged terms for
``"mean"``), the

* empirical Fisher is :math:`F_{\mathrm{emp}} = c \sum_n \nabla \ell_n \nabla \ell_n^\top`
  (from exact per-example gradients; *not* the square of the batch gradient), and the
* generalized Fisher is :math:`G = c \sum_n J_n^\top \frac{\partial^2 \ell_n}{\partial f_n^2} J_n`,
  which equals the Hessian of :math:`L` for a model linear in its parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from secorder_hooks.engine.sync import SyncOption
from secorder_hooks.function_api.empirical import LossFn, empirical_fisher
from secorder_hooks.function_api.ggn import generalized_fisher
from secorder_hooks.function_api.validation import Inputs
from secorder_hooks.losses.kinds import LossKind

__all__ = ["empirical_fisher_diagonal", "generalized_fisher_diagonal"]


def empirical_fisher_diagonal(
    model: nn.Module, loss_fn: LossFn, inputs: Inputs, targets: Tensor, *, sync: SyncOption = None
) -> list[Tensor]:
    r"""Exact diagonal of the empirical Fisher :math:`c \sum_n \nabla_\theta \ell_n \odot \nabla_\theta \ell_n`.

    One backward pass of the hook engine with :class:`~secorder_hooks.SumGradSquared`
    (:math:`\sum_n (c \nabla \ell_n)^2`), divided by :math:`c`. For cross-entropy with
    ``reduction="mean"`` over ``[N, C]`` this is ``N * sum_grad_squared``. If the engine
    declines the model, exact per-example gradients come from batched autograd instead
    (with a :class:`~secorder_hooks.FallbackWarning`). ``.grad`` is left as it was.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.zeros(2, 1)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 1.0]]))
        >>> empirical_fisher_diagonal(model, torch.nn.MSELoss(reduction="sum"), x, y)[0]
        tensor([[ 4., 64.]])

    Args:
        model: The model; dim 0 of ``inputs`` indexes the examples.
        loss_fn: One standard loss (``nn.CrossEntropyLoss``, ``nn.NLLLoss``, ``nn.MSELoss``,
            ``nn.BCEWithLogitsLoss`` or their functional forms, any options) applied to
            the model output; its reduction sets :math:`c`.
        inputs: Model input ``[N, ...]``, a tuple of positional inputs, or a dict of keyword
            arguments (``model(**inputs)``, e.g. ``input_ids`` and ``attention_mask``).
        targets: Targets ``[N, ...]`` as the loss expects them.
        sync: Data-parallel training: the result of the global batch of all processes
            (``None``: if ``model`` is a ``DistributedDataParallel``; ``True`` or a process
            group: always; ``False``: this process's batch), as for
            :func:`~secorder_hooks.core.hessian_diagonal.model_hessian_diagonal`.

    Returns:
        Aligned with ``list(model.parameters())``, one tensor per parameter, of its shape
        (zeros for parameters that do not require grad).

    Raises:
        ValueError: Mismatched or empty batches, targets that do not fit the loss,
            ``reduction="none"``.
        UnsupportedLossError: ``loss_fn`` is not one standard loss (the reduction factor,
            hence the scale, would be unknown).
    """
    return empirical_fisher(model, loss_fn, inputs, targets, trace=False, caller="empirical_fisher_diagonal", sync=sync)


def generalized_fisher_diagonal(
    model: nn.Module,
    outputs: Tensor,
    targets: Tensor,
    loss_type: str | LossKind = "nll",
    create_graph: bool = False,
    *,
    reduction: str = "mean",
    mc_samples: int | None = None,
    generator: torch.Generator | None = None,
    sync: SyncOption = None,
) -> list[Tensor]:
    r"""Exact diagonal of the generalized Fisher (GGN) for the likelihood ``loss_type``.

    :math:`\operatorname{diag}(c \sum_n J_n^\top H_n J_n)` with :math:`J_n` the Jacobian of
    ``outputs[n]`` with respect to the parameters and :math:`H_n` the Hessian of the
    negative log-likelihood :math:`\ell_n` at ``outputs[n]``:

    * ``"nll"`` / ``"cross_entropy"``: categorical over logits ``[N, C, *d]`` (``F.cross_entropy``),
      :math:`H_n = \operatorname{diag}(p_n) - p_n p_n^\top`;
    * ``"mse"`` / ``"gaussian"``: ``F.mse_loss`` (Gaussian with variance 1/2), :math:`H_n = 2I`;
    * ``"bce"`` / ``"bernoulli"``: ``F.binary_cross_entropy_with_logits``,
      :math:`H_n = \operatorname{diag}(\sigma(f_n)(1 - \sigma(f_n)))`.

    For these likelihoods the GGN equals the (true) Fisher. ``outputs`` come from a forward
    pass the caller already ran: inside :func:`secorder_hooks.extend` the engine's records
    give one vectorized backward; otherwise an exact generic path backpropagates every
    square-root column of every example through the graph of ``outputs``
    (``C * N`` vectors for ``"nll"``, chunked). With ``mc_samples`` the unbiased
    Monte-Carlo estimate with that many targets sampled per example from the model's
    predictive distribution is returned instead.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> x = torch.randn(4, 3)
        >>> outputs = model(x)
        >>> targets = torch.randn(4, 2)
        >>> diag = generalized_fisher_diagonal(model, outputs, targets, loss_type="mse", reduction="sum")
        >>> torch.allclose(diag[0], 2 * (x**2).sum(0).expand(2, 3))
        True

    Args:
        model: The model whose parameters produced ``outputs``.
        outputs: Model output ``[N, *f]`` with its graph (logits for ``"nll"`` and ``"bce"``).
        targets: ``"nll"``: class indices ``[N, *d]`` or probabilities shaped like ``outputs``;
            ``"mse"``, ``"bce"``: floating, shaped like ``outputs``.
        loss_type: The likelihood (case-insensitive; aliases above).
        create_graph: Make the result differentiable through the model Jacobians (the
            loss-Hessian factors are constants); always uses the generic path.
        reduction: ``"mean"`` (default, as the other functions' losses) or ``"sum"``: sets :math:`c`.
        mc_samples: If given, the number of Monte-Carlo samples per example.
        generator: Random generator for the Monte-Carlo samples.
        sync: Data-parallel training: the result of the global batch of all processes
            (``None``: if ``model`` is a ``DistributedDataParallel``; ``True`` or a process
            group: always; ``False``: this process's batch), as for
            :func:`~secorder_hooks.core.hessian_diagonal.model_hessian_diagonal`.

    Returns:
        Aligned with ``list(model.parameters())``, one tensor per parameter, of its shape
        (zeros for parameters that do not require grad or do not influence ``outputs``).

    Raises:
        NotImplementedError: Unknown ``loss_type``, or outputs/targets of shapes or dtypes
            the likelihood does not support
            (:class:`~secorder_hooks.errors.LossShapeError`, also a ``ValueError``).
        ValueError: ``outputs`` without a graph, an empty batch, ``mc_samples < 1``.
    """
    return generalized_fisher(
        model,
        outputs,
        targets,
        loss_type,
        create_graph,
        reduction,
        mc_samples,
        generator,
        "generalized_fisher_diagonal",
        sync,
    )
