r"""What the engine knows about the curvature of autograd nodes.

The exact Hessian of the loss differs from the GGN by one term per curved operation
between a parameter and the loss. Autograd nodes are classified by type name:

* :data:`AFFINE`: jointly (piecewise) linear in all their inputs (views, sums,
  concatenation, padding, pooling, ReLU, dropout, ...): no term.
* :data:`MULTILINEAR`: linear in each input separately (products, matrix products,
  convolutions, normalizations in eval mode): a term only between parameters that
  reach two different inputs, which is off the diagonal unless both inputs depend on
  the same parameter (handled for elementwise products, refused otherwise).
* :data:`LINEAR_IN_FIRST`: linear in the first input, curved in the second (division):
  no term when no parameter reaches the second.
* :data:`ELEMENTWISE`: :math:`h = \phi(a)` elementwise; the term is
  :math:`\sum_e \phi''(a_e)\, \partial L/\partial h_e\, (\partial a_e/\partial\theta)^2`.
  Each entry computes :math:`\phi''(a)` from what the node saved.

Any other node with a parameter below it is refused by the engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import Node

from secorder_hooks.errors import UnsupportedOperationError

__all__ = [
    "AFFINE",
    "MULTILINEAR",
    "ELEMENTWISE",
    "ELEMENTWISE_PRODUCT",
    "LINEAR_IN_FIRST",
    "DIAGONAL",
    "second_derivative",
    "node_name",
]

PIECEWISE_LINEAR = frozenset(
    {
        "ReluBackward0",
        "ReluBackward1",
        "ThresholdBackward0",
        "ThresholdBackward1",
        "LeakyReluBackward0",
        "LeakyReluBackward1",
        "HardtanhBackward0",  # also F.relu6 / nn.ReLU6, in place or not
        "HardtanhBackward1",
        "HardsigmoidBackward0",  # relu6(a + 3) / 6, in place or not
        "HardshrinkBackward0",
        "SoftshrinkBackward0",
        "AbsBackward0",
    }
)
"""Unary elementwise nodes that are piecewise linear (zero second derivative almost everywhere).

At a kink the second derivative is taken as zero, as torch's own double backward of
these operations does (where it has one; ``hardsigmoid`` has none)."""

AFFINE = (
    frozenset(
        {
            "AccumulateGrad",
            "AddBackward0",
            "SubBackward0",
            "RsubBackward0",
            "CatBackward0",
            "StackBackward0",
            "WhereBackward0",
            "AddBackward1",
            "SubBackward1",
            "RsubBackward1",
            "NegBackward0",
            "MulBackward1",
            "DivBackward1",
            "AliasBackward0",
            "CloneBackward0",
            "ToCopyBackward0",
            "ViewBackward0",
            "UnsafeViewBackward0",
            "ReshapeAliasBackward0",
            "AsStridedBackward0",
            "PermuteBackward0",
            "TransposeBackward0",
            "TransposeBackward1",
            "TBackward0",
            "ExpandBackward0",
            "SqueezeBackward0",
            "SqueezeBackward1",
            "SqueezeBackward2",
            "UnsqueezeBackward0",
            "SliceBackward0",
            "SelectBackward0",
            "IndexBackward0",
            "IndexSelectBackward0",
            "GatherBackward0",
            "NarrowBackward0",
            "FlipBackward0",
            "RollBackward0",
            "RepeatBackward0",
            "UnfoldBackward0",
            "Im2ColBackward0",
            "Col2ImBackward0",
            "PixelShuffleBackward0",
            "PixelUnshuffleBackward0",
            "SplitBackward0",
            "SplitWithSizesBackward0",
            "UnbindBackward0",
            "SumBackward0",
            "SumBackward1",
            "MeanBackward0",
            "MeanBackward1",
            "CumsumBackward0",
            "TrilBackward0",
            "TriuBackward0",
            "DiagonalBackward0",
            "MaskedFillBackward0",
            "ConstantPadNdBackward0",
            "ReflectionPad1DBackward0",
            "ReflectionPad2DBackward0",
            "ReflectionPad3DBackward0",
            "ReplicationPad1DBackward0",
            "ReplicationPad2DBackward0",
            "ReplicationPad3DBackward0",
            "UpsampleNearest1DBackward0",
            "UpsampleNearest2DBackward0",
            "UpsampleNearest3DBackward0",
            "UpsampleLinear1DBackward0",
            "UpsampleBilinear2DBackward0",
            "AvgPool2DBackward0",
            "AvgPool3DBackward0",
            "AdaptiveAvgPool2DBackward0",
            "AdaptiveAvgPool3DBackward0",
            "MaxPool2DWithIndicesBackward0",
            "MaxPool3DWithIndicesBackward0",
            "AdaptiveMaxPool2DBackward0",
            "AdaptiveMaxPool3DBackward0",
            "MaxBackward0",
            "MaxBackward1",
            "MinBackward0",
            "MinBackward1",
            "AmaxBackward0",
            "AminBackward0",
            "NativeDropoutBackward0",
            "EmbeddingBackward0",
            "CopySlices",
            "CopyBackwards",
            "_DDPSinkBackward",  # DistributedDataParallel(find_unused_parameters=True): identity on its outputs
        }
    )
    | PIECEWISE_LINEAR
)
"""Nodes whose output is (piecewise) linear in all their inputs jointly."""

ELEMENTWISE_PRODUCT = "MulBackward0"

MULTILINEAR: dict[str, tuple[int, ...]] = {
    ELEMENTWISE_PRODUCT: (0, 1),
    "MmBackward0": (0, 1),
    "AddmmBackward0": (1, 2),
    "BmmBackward0": (0, 1),
    "BaddbmmBackward0": (1, 2),
    "MvBackward0": (0, 1),
    "AddmvBackward0": (1, 2),
    "DotBackward0": (0, 1),
    "LinearBackward0": (0, 1),
    "ConvolutionBackward0": (0, 1),
    "PreluKernelBackward0": (0, 1),
    "TrilinearBackward0": (0, 1, 2),
    "NativeBatchNormBackward0": (0, 1),
}
"""Nodes linear in each input separately: type name -> positions of the multiplied inputs."""


LINEAR_IN_FIRST: frozenset[str] = frozenset({"DivBackward0"})
"""Binary nodes linear in their first input and curved in the second (``a / b``): no term
when no parameter reaches the second input (division by a constant, e.g. a temperature)."""


def _from_result(fn: Callable[[Tensor], Tensor]) -> Callable[[Node], Tensor]:
    return lambda node: fn(node._saved_result)


def _from_input(fn: Callable[[Tensor], Tensor]) -> Callable[[Node], Tensor]:
    return lambda node: fn(node._saved_self)


def _hardswish(a: Tensor) -> Tensor:
    r""":math:`\phi''` of :math:`\phi(a) = a\,\mathrm{relu6}(a + 3) / 6`: :math:`1/3` on :math:`(-3, 3)`, else 0.

    Piecewise quadratic: :math:`(a^2 + 3a) / 6` on :math:`(-3, 3)`, :math:`0` below,
    :math:`a` above. At :math:`\pm 3` torch's own double backward also gives 0.
    """
    inside = (a > -3) & (a < 3)
    return torch.where(inside, torch.full_like(a, 1 / 3), torch.zeros_like(a))


def _elu_from_result(node: Node) -> Tensor:
    r""":math:`\phi''` of an in-place ``elu`` / ``selu`` / ``celu`` from its saved result :math:`y`.

    :math:`y = s\,a` for :math:`a > 0` and :math:`y = s \alpha (e^{\beta a} - 1)` otherwise
    (scale :math:`s`, input scale :math:`\beta`); so :math:`\phi''(a) = \beta^2 (y + s\alpha)`
    where :math:`y \le 0` and 0 where :math:`y > 0` (in-place ``elu`` requires :math:`\alpha \ge 0`).
    """
    y = node._saved_result
    alpha = float(node._saved_alpha)
    scale = float(getattr(node, "_saved_scale", 1.0))
    beta = float(getattr(node, "_saved_input_scale", 1.0 / alpha if node_name(node).startswith("Celu") else 1.0))
    return torch.where(y > 0, torch.zeros_like(y), beta**2 * (y + scale * alpha))


def _by_autograd(phi: Callable[[Node, Tensor], Tensor]) -> Callable[[Node], Tensor]:
    r""":math:`\phi''(a)` of an elementwise function re-evaluated at the saved input.

    Raises:
        UnsupportedOperationError: torch cannot differentiate the function twice (for
            this input's dtype or device).
    """

    def second(node: Node) -> Tensor:
        try:
            with torch.enable_grad():
                a = node._saved_self.detach().requires_grad_(True)
                (first,) = torch.autograd.grad(phi(node, a).sum(), a, create_graph=True)
                (result,) = torch.autograd.grad(first.sum(), a, allow_unused=True)
        except (RuntimeError, NotImplementedError) as error:
            raise UnsupportedOperationError(
                f"the exact Hessian needs the second derivative of the elementwise operation {node_name(node)}, and "
                f"torch cannot differentiate it twice here ({str(error).strip().splitlines()[0]}). Replace the "
                "activation by one with a second derivative, or use DiagGGNExact (no second derivative needed)."
            ) from error
        return torch.zeros_like(a) if result is None else result.detach()

    return second


ELEMENTWISE: dict[str, Callable[[Node], Tensor]] = {
    "SigmoidBackward0": _from_result(lambda s: s * (1 - s) * (1 - 2 * s)),
    "TanhBackward0": _from_result(lambda t: -2 * t * (1 - t * t)),
    "ExpBackward0": _from_result(lambda y: y),
    "SqrtBackward0": _from_result(lambda y: -0.25 / y**3),
    "RsqrtBackward0": _from_result(lambda y: 0.75 * y**5),
    "ReciprocalBackward0": _from_result(lambda y: 2 * y**3),
    "GeluBackward0": _by_autograd(lambda n, a: F.gelu(a, approximate=n._saved_approximate)),
    "SiluBackward0": _by_autograd(lambda n, a: F.silu(a)),
    "MishBackward0": _by_autograd(lambda n, a: F.mish(a)),
    "EluBackward0": _by_autograd(
        lambda n, a: torch.ops.aten.elu(a, n._saved_alpha, n._saved_scale, n._saved_input_scale)
    ),
    "EluBackward1": _elu_from_result,  # in-place elu / selu
    "CeluBackward0": _by_autograd(lambda n, a: F.celu(a, n._saved_alpha)),
    "CeluBackward1": _elu_from_result,  # in-place celu
    "SoftplusBackward0": _by_autograd(lambda n, a: F.softplus(a, n._saved_beta, n._saved_threshold)),
    "LogSigmoidBackward0": _by_autograd(lambda n, a: F.logsigmoid(a)),
    "HardswishBackward0": _from_input(_hardswish),  # in place or not
    "LogBackward0": _by_autograd(lambda n, a: torch.log(a)),
    "SinBackward0": _by_autograd(lambda n, a: torch.sin(a)),
    "CosBackward0": _by_autograd(lambda n, a: torch.cos(a)),
    "PowBackward0": _by_autograd(lambda n, a: torch.pow(a, n._saved_exponent)),
}
"""Elementwise curved nodes: type name -> :math:`\\phi''(a)` (shape of the input ``a``)."""


DIAGONAL = (
    frozenset(ELEMENTWISE)
    | PIECEWISE_LINEAR
    | {
        "NegBackward0",
        "AddBackward1",
        "SubBackward1",
        "RsubBackward1",
        "MulBackward1",
        "DivBackward1",
        "CloneBackward0",
        "AliasBackward0",
        "ToCopyBackward0",
    }
)
"""Unary elementwise nodes: their Jacobian is diagonal."""


def node_name(node: Node) -> str:
    """The type name of an autograd node, e.g. ``"SigmoidBackward0"``."""
    return type(node).__name__


def second_derivative(node: Node) -> Tensor:
    r""":math:`\phi''(a)` for an :data:`ELEMENTWISE` node, shaped like its input."""
    return ELEMENTWISE[node_name(node)](node)
