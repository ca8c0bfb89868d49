"""The input factor of convolutions from patches laid out with the positions last (``patch_rows``).

Checked against an independent construction of the patches (``torch.func.jacrev`` of the
convolution with respect to its weight, whose entries are the input patches) and a
brute-force mean of outer products, in float64.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from secorder_hooks.quantities import WeightSharing
from secorder_hooks.rules.conv import patch_rows, unfold_patches
from secorder_hooks.rules.kronecker import input_moment, input_moment_rows

CASES = {
    "conv1d_dilation_groups": lambda: (nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), (3, 4, 11)),
    "conv1d_circular": lambda: (nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"), (2, 2, 7)),
    "conv2d": lambda: (nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 0), dilation=(2, 1)), (3, 2, 6, 5)),
    "conv2d_same_reflect": lambda: (nn.Conv2d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 2, 5, 6)),
    "conv2d_valid_groups": lambda: (nn.Conv2d(6, 4, 2, padding="valid", groups=2), (2, 6, 4, 4)),
    "conv2d_replicate": lambda: (nn.Conv2d(3, 2, 3, stride=2, padding=1, padding_mode="replicate"), (2, 3, 7, 6)),
    "conv3d": lambda: (nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=(0, 1, 1)), (2, 2, 3, 4, 3)),
}


def reference_patches(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """``[N, G, P, C_g * prod(kernel)]``: the patches read off the Jacobian of the output with respect to the weight.

    ``out[n, g*O_g + o, p]`` depends on ``weight[g*O_g + o]`` through the patch of location ``p``:
    row ``o = 0`` of each group's block of the Jacobian is that patch.
    """
    weight = module.weight.detach()

    def conv(w: Tensor) -> Tensor:
        return torch.func.functional_call(module, {"weight": w}, (x,))

    jac = torch.func.jacrev(conv)(weight)  # [N, C_out, *O, C_out, C_g, *K]
    n, c_out = x.shape[0], weight.shape[0]
    jac = jac.reshape(n, c_out, -1, c_out, weight[0].numel())
    per_group = c_out // module.groups
    rows = [jac[:, g * per_group, :, g * per_group] for g in range(module.groups)]  # each [N, P, C_g * K]
    return torch.stack(rows, dim=1)


def brute_force_moment(patches: Tensor, bias: bool, sharing: WeightSharing) -> Tensor:
    """``[G, I', I']``: the mean of ``a a^T`` over examples (and positions) by one einsum, the constant 1 appended."""
    if sharing is WeightSharing.REDUCE:
        patches = patches.mean(2, keepdim=True)
    if bias:
        patches = torch.cat([patches, torch.ones_like(patches[..., :1])], dim=-1)
    n, t = patches.shape[0], patches.shape[2]
    return torch.einsum("ngti,ngtj->gij", patches, patches) / (n * t)


@pytest.mark.parametrize("name", list(CASES))
def test_patch_rows_are_the_patches_with_positions_last(name):
    torch.manual_seed(0)
    module, shape = CASES[name]()
    module = module.double()
    x = torch.randn(*shape, dtype=torch.float64)
    rows = patch_rows(module, x)
    patches = reference_patches(module, x)
    torch.testing.assert_close(rows.permute(2, 0, 3, 1), patches, rtol=0, atol=1e-14)
    assert torch.equal(rows.permute(2, 0, 3, 1), unfold_patches(module, x))  # the same numbers, copied


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias_folded"])
@pytest.mark.parametrize("sharing", [WeightSharing.EXPAND, WeightSharing.REDUCE])
@pytest.mark.parametrize("name", list(CASES))
def test_input_moment_rows_is_the_mean_outer_product(name, sharing, bias):
    torch.manual_seed(1)
    module, shape = CASES[name]()
    module = module.double()
    x = torch.randn(*shape, dtype=torch.float64)
    expected = brute_force_moment(reference_patches(module, x), bias, sharing)
    result = input_moment_rows(patch_rows(module, x), bias, sharing)
    torch.testing.assert_close(result, expected, rtol=1e-12, atol=1e-13)
    # the same factor as the layout of positions before features (Linear layers' path)
    torch.testing.assert_close(result, input_moment(unfold_patches(module, x), bias, sharing), rtol=1e-12, atol=1e-13)
    assert result.is_contiguous()


def test_input_moment_rows_detects_a_wrong_bias_block():
    """A test that can fail: the bias row of the folded factor is the inputs' mean, not their sum."""
    torch.manual_seed(2)
    rows = torch.rand(1, 3, 4, 5, dtype=torch.float64) + 1
    folded = input_moment_rows(rows, True, WeightSharing.EXPAND)
    mean = rows.mean((-2, -1))[0]
    torch.testing.assert_close(folded[0, :3, 3], mean)
    torch.testing.assert_close(folded[0, 3, :3], mean)
    assert folded[0, 3, 3].item() == 1.0
    assert not torch.allclose(folded[0, :3, 3], rows.sum((-2, -1))[0])
    torch.testing.assert_close(folded[0, :3, :3], input_moment_rows(rows, False, WeightSharing.EXPAND)[0])


def test_patch_rows_rejects_an_unbatched_input():
    from secorder_hooks.errors import UnsupportedModuleError

    with pytest.raises(UnsupportedModuleError, match="batched input"):
        patch_rows(nn.Conv2d(1, 1, 2), torch.randn(1, 4, 4))


def test_patch_rows_padding_matches_the_module():
    """Zero padding of the view equals the module's: the convolution of the patches is the output."""
    torch.manual_seed(3)
    module = nn.Conv2d(3, 4, 3, padding=1, stride=2).double()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    rows = patch_rows(module, x)  # [G, I, N, P]
    out = torch.einsum("oi,inp->nop", module.weight.flatten(1), rows[0]) + module.bias[:, None]
    torch.testing.assert_close(out, module(x).flatten(2), rtol=1e-12, atol=1e-12)


def test_patch_rows_of_a_channels_last_input():
    """The view follows the input's strides: a channels-last input gives the same patches."""
    torch.manual_seed(4)
    module = nn.Conv2d(3, 4, 3, padding=1, dilation=2, groups=1).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    rows = patch_rows(module, x.to(memory_format=torch.channels_last))
    assert torch.equal(rows, patch_rows(module, x))
    torch.testing.assert_close(rows.permute(2, 0, 3, 1), reference_patches(module, x), rtol=0, atol=1e-14)
