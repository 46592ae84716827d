"""Registry of feature extractors ("backbones"), by name.

A backbone is an ``nn.Module`` that maps normalised pixels ``Tensor[N, 3, H, W]`` to one
layer's feature map ``Tensor[N, C, H / stride, W / stride]``, and whose ``fuse()`` rewrites it
for inference (:mod:`dtm_ops.backbones.fusion`). Each builder takes the layer
name and a ``weights`` argument: ``None`` for the packaged default weights, a path to a
local weights file, or the string ``"random"`` to ask explicitly for random weights
(tests). Weights are never downloaded and never silently random.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dtm_ops.errors import WeightsError

if TYPE_CHECKING:
    from torch import nn

RANDOM = "random"


@dataclass(frozen=True)
class LayerSpec:
    channels: int
    stride: int
    doc: str


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    layers: dict[str, LayerSpec]
    default_layer: str
    build: Callable[[str, str | None], "nn.Module"]


_REGISTRY: dict[str, BackboneInfo] = {}


def register(info: BackboneInfo) -> BackboneInfo:
    _REGISTRY[info.name] = info
    return info


def available() -> dict[str, BackboneInfo]:
    _load_builtin()
    return dict(_REGISTRY)


def get(name: str) -> BackboneInfo:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def build(name: str, layer: str | None = None, weights: str | None = None, *, fuse: bool = True) -> "nn.Module":
    """Build backbone ``name`` cut at ``layer`` (default: the backbone's default layer), in
    eval mode.

    The returned module has attributes ``name``, ``layer``, ``channels``, ``stride``,
    ``weights_id`` (sha256 of the weights file, or ``"random"``) and a ``normalize``
    method mapping RGB pixels in 0..255 to the network's input range. ``fuse``: batch
    norms folded into convolutions and similar rewrites for inference
    (:mod:`dtm_ops.backbones.fusion`); the same function up to float rounding.
    """
    info = get(name)
    layer = layer or info.default_layer
    if layer not in info.layers:
        raise ValueError(f"backbone {name!r} has no layer {layer!r}; layers: {', '.join(info.layers)}")
    module = info.build(layer, weights)
    module.name = name
    module.layer = layer
    module.channels = info.layers[layer].channels
    module.stride = info.layers[layer].stride
    module.eval()
    if fuse:
        module.fuse()
    return module


_HASHES: dict[tuple[str, float, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 of a weights file (cached per path, mtime and size)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def load_state_dict(path: str, backbone: str) -> dict:
    """Load a weights file without unpickling arbitrary objects."""
    import torch

    if not os.path.isfile(path):
        raise WeightsError(f"{backbone}: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same user error
        raise WeightsError(f"{backbone}: cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{backbone}: weights file {path} does not hold a state dict")
    return state


def _load_builtin() -> None:
    from dtm_ops.backbones import efficientnet_lite, torchvision_models  # noqa: F401
