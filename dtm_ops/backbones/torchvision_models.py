"""torchvision classification backbones (ResNets) from a weights file the user provides.

torchvision's own weight download cannot work offline, so ``weights`` must be a local
path (e.g. ``resnet50-0676ba61.pth``) or ``"random"`` explicitly.
"""

from __future__ import annotations

from dtm_ops.backbones import RANDOM, BackboneInfo, LayerSpec, file_sha256, fusion, load_state_dict, register
from dtm_ops.errors import WeightsError

_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _resnet_builder(arch: str):
    def build(layer: str, weights: str | None):
        import torch
        import torchvision
        from torch import nn

        if weights is None:
            raise WeightsError(
                f"{arch}: no weights file given. torchvision weights cannot be downloaded here; "
                f"pass weights=PATH (CLI: --weights PATH) to a local {arch} state dict, "
                "or weights='random' to ask for random weights explicitly"
            )
        net = getattr(torchvision.models, arch)(weights=None)
        if weights == RANDOM:
            weights_id = RANDOM
        else:
            state = load_state_dict(weights, arch)
            try:
                net.load_state_dict(state, strict=True)
            except RuntimeError as exc:
                raise WeightsError(f"{arch}: weights file {weights} does not fit: {str(exc)[:300]}") from exc
            weights_id = file_sha256(weights)
        stages = ["layer1", "layer2", "layer3", "layer4"]
        keep = stages[: stages.index(layer) + 1]

        class _ResNetFeatures(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(
                    net.conv1, net.bn1, net.relu, net.maxpool, *(getattr(net, s) for s in keep)
                )
                self.weights_id = weights_id
                self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
                self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

            def normalize(self, pixels: "torch.Tensor") -> "torch.Tensor":
                return (pixels - self.mean.to(pixels.dtype)) / self.std.to(pixels.dtype)

            def forward(self, x: "torch.Tensor") -> "torch.Tensor":
                return self.body(x)

            def fuse(self) -> None:
                """Batch norms folded into their convolutions (:mod:`dtm_ops.backbones.fusion`);
                eval mode only. torchvision's ReLUs already work in place."""
                fusion.fold_sequential(self.body)
                for stage in self.body[4:]:
                    for block in stage:
                        for i in (1, 2, 3):
                            if hasattr(block, f"bn{i}"):
                                fusion.fold(block, f"conv{i}", f"bn{i}")
                        if block.downsample is not None:
                            fusion.fold_sequential(block.downsample)

        return _ResNetFeatures()

    return build


for _arch, _exp in (("resnet18", 1), ("resnet34", 1), ("resnet50", 4), ("resnet101", 4)):
    register(
        BackboneInfo(
            name=_arch,
            layers={
                "layer2": LayerSpec(128 * _exp, 8, "stage-2 output"),
                "layer3": LayerSpec(256 * _exp, 16, "stage-3 output"),
                "layer4": LayerSpec(512 * _exp, 32, "stage-4 output"),
            },
            default_layer="layer3",
            build=_resnet_builder(_arch),
        )
    )
