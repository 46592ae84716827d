"""Inference rewrites of the backbones (dtm_ops.backbones.fusion) against the networks as
built, unfused: the same function up to float rounding, for every layer, odd input sizes
(strided layers keep their asymmetric padding) and batch norms that are not the identity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dtm_ops import backbones
from dtm_ops.backbones import fusion


def _perturb_batch_norms(*nets: nn.Module) -> None:
    """Give every batch norm the same non-trivial statistics and affine parameters in each
    net (random weights leave them at the identity, which would hide a wrong fold)."""
    g = torch.Generator().manual_seed(0)
    per_net = [[m for m in net.modules() if isinstance(m, nn.BatchNorm2d)] for net in nets]
    assert per_net[0] and all(len(b) == len(per_net[0]) for b in per_net)
    for bns in zip(*per_net):
        c = bns[0].num_features
        mean, var = torch.randn(c, generator=g) * 0.1, torch.rand(c, generator=g) + 0.5
        weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1
        for bn in bns:
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.weight.data.copy_(weight)
            bn.bias.data.copy_(bias)


def _same(reference: nn.Module, fused: nn.Module, size: tuple[int, int]) -> None:
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 255
    with torch.inference_mode():
        want = reference(reference.normalize(x))
        got = fused(fused.normalize(x.clone()).contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape
    err = (got - want).abs().max().item() / want.abs().max().item()
    assert err < 1e-4, err


@pytest.mark.parametrize("layer", ["block_s8", "block_s16", "head", "head_os16"])
def test_efficientnet_lite0_fused_equals_the_network_as_built(layer):
    """Packaged weights (real batch-norm statistics)."""
    ref = backbones.build("efficientnet_lite0", layer, fuse=False)
    fused = backbones.build("efficientnet_lite0", layer).to(memory_format=torch.channels_last)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    for size in [(96, 160), (75, 130)]:  # a multiple of 32 as preprocessing makes, and odd sizes
        _same(ref, fused, size)


def test_resnet_fused_equals_the_network_as_built():
    ref = backbones.build("resnet50", "layer3", weights="random", fuse=False)
    fused = backbones.build("resnet50", "layer3", weights="random", fuse=False)
    fused.load_state_dict(ref.state_dict())
    _perturb_batch_norms(ref, fused)
    fused.fuse()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    for size in [(64, 96), (77, 101)]:
        _same(ref, fused, size)


def test_static_padding_only_where_it_equals_same_padding():
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    torch.manual_seed(0)
    x = torch.randn(1, 4, 13, 18)
    for k, stride, dilation in [(3, 1, 1), (5, 1, 1), (3, 1, 2), (3, 2, 1), (5, 2, 1), (4, 1, 1), (1, 1, 1)]:
        conv = Conv2dDynamicSamePadding(4, 6, k, stride=stride, dilation=dilation)
        out = fusion.static_padding(conv)
        static = stride == 1 and (k - 1) * dilation % 2 == 0
        assert (type(out) is nn.Conv2d) == static, (k, stride, dilation)
        assert torch.allclose(out(x), conv(x), atol=1e-6)


def test_fold_refuses_what_is_not_a_conv_then_an_eval_batch_norm():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="cannot fold"):
        fusion.fold(m, "0", "1")  # a batch norm in training mode normalises by batch statistics
    m.eval()
    fusion.fold(m, "0", "1")
    assert isinstance(m[1], nn.Identity)
