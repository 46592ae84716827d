"""Feature extraction: image -> per-position L2-normalised feature map.

Frames (indexing) and query windows (templates) go through this one class, so both get
the same preprocessing, backbone, layer and projection. Its :attr:`fingerprint` is
recorded with every feature set.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image

from dtm_ops import backbones
from dtm_ops.fingerprint import Fingerprint
from dtm_ops.preprocess import Prepared, Preprocess
from dtm_ops.projection import Projection

if TYPE_CHECKING:
    from dtm_ops.media import LazyImage


@dataclass
class FrameFeatures:
    """Features of one image.

    Attributes:
        features (Tensor[C, Hc, Wc]): unit-norm per valid cell, zero elsewhere (padding).
        valid: ``(rows, cols)`` of cells that lie on the image.
        scale: pixel scale of the resized image against the original.
        size: original ``(width, height)``.
    """

    features: torch.Tensor
    valid: tuple[int, int]
    scale: float
    size: tuple[int, int]


#: Images per forward pass on the CPU. Batching there is slower, not faster: each layer's
#: output for a batch is larger than the caches, and large fresh allocations cost a page
#: fault per 4 KiB. EfficientNet-Lite0 at 640x288 on 2 cores: 38.4 frames/s one at a
#: time, 21.7 in batches of 8 (``benchmarks/bench_extract.py``, ``extract-cpu.txt``).
#: GPUs take the whole batch.
CPU_FORWARD_BATCH = 1


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class FeatureExtractor:
    """Backbone + layer + preprocessing + optional projection.

    Args:
        backbone: registry name (see :mod:`dtm_ops.backbones`).
        layer: the backbone's layer to match on (default: the backbone's default).
        long_side: frames are resized so their long side is this many pixels.
        reduced_decode: frames read by indexing (JPEG files, video frames) are decoded at a
            reduced size where the resize at least halves them (:mod:`dtm_ops.preprocess`);
            off: in full, as feature sets indexed before this option were.
        weights: ``None`` for packaged weights, a local file, or ``"random"``.
        projection: optional PCA applied after per-position normalisation.
        device: default CUDA when present, else CPU (CUDA runs in fp16 autocast).
        batch_size: images per forward pass.
    """

    def __init__(
        self,
        backbone: str = "efficientnet_lite0",
        layer: str | None = None,
        *,
        long_side: int = 640,
        weights: str | None = None,
        projection: Projection | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 8,
        reduced_decode: bool = True,
    ) -> None:
        self.device = torch.device(device) if device is not None else default_device()
        self.net = backbones.build(backbone, layer, weights).to(self.device, memory_format=torch.channels_last)
        self.preprocess = Preprocess(
            long_side=long_side, multiple=max(32, self.net.stride), reduced_decode=reduced_decode
        )
        self.projection = projection
        self.batch_size = batch_size

    @property
    def stride(self) -> int:
        return int(self.net.stride)

    @property
    def channels(self) -> int:
        return self.projection.out_channels if self.projection is not None else int(self.net.channels)

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint(
            backbone=self.net.name,
            weights=self.net.weights_id,
            layer=self.net.layer,
            stride=self.stride,
            channels=self.channels,
            preprocess=self.preprocess.to_dict(),
            projection=self.projection.digest if self.projection is not None else None,
        )

    def valid_cells(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(rows, cols)`` of cells covering a resized image of ``size = (w, h)``."""
        return math.ceil(size[1] / self.stride), math.ceil(size[0] / self.stride)

    @torch.inference_mode()
    def _forward(
        self, pixels: torch.Tensor, sizes: Sequence[tuple[int, int]], project: bool, dtype: torch.dtype
    ) -> torch.Tensor:
        """``pixels (Tensor[N, 3, H, W])``, RGB in 0..255 (uint8 from :class:`Preprocess`) ->
        ``Tensor[N, C, H/s, W/s]`` of ``dtype`` on CPU.

        Features are normalised in float32 and cast to ``dtype`` where they were computed,
        so a GPU copies ``dtype`` bytes back to the host (half of them for float16: the
        copy of float32 features took most of an indexing batch on an H200), into
        page-locked memory (:meth:`_host_buffer`).
        """
        x = pixels.to(self.device, non_blocking=True).float()  # uint8 crosses to a GPU: 1/4 of the bytes
        x = self.net.normalize(x)
        for n, (w, h) in enumerate(sizes):  # padding is mean grey after normalisation
            x[n, :, h:, :] = 0
            x[n, :, :, w:] = 0
        x = x.contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                f = self.net(x)
        else:  # one image at a time: see CPU_FORWARD_BATCH
            f = torch.cat([self.net(x[i : i + CPU_FORWARD_BATCH]) for i in range(0, len(x), CPU_FORWARD_BATCH)])
        f = torch.nn.functional.normalize(f.float(), dim=1)
        if project and self.projection is not None:
            f = self.projection(f)
        for n, size in enumerate(sizes):
            rows, cols = self.valid_cells(size)
            f[n, :, rows:, :] = 0
            f[n, :, :, cols:] = 0
        f = f.to(dtype, memory_format=torch.contiguous_format)  # NCHW, whatever layout the network left
        if self.device.type != "cuda":
            return f
        host = self._host_buffer(f.shape, dtype)
        host.copy_(f, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host

    def _host_buffer(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """An empty host tensor; page-locked where the network runs on CUDA, so that copies
        to and from the GPU run at the bus's speed, need no CPU copy through the driver's
        staging buffer, and the upload does not wait for the GPU (a pageable one does).

        The cost: the features stay page-locked until their caller drops them (indexing:
        until their shard is written, e.g. 4.3 GB for 256 frames of ResNet-50 ``layer3``
        at 1080p in float16), and torch's caching host allocator keeps freed blocks for the
        next batches rather than giving them back."""
        return torch.empty(tuple(shape), dtype=dtype, pin_memory=self.device.type == "cuda")

    def extract_prepared(
        self, prepared: Sequence[Prepared], *, project: bool = True, dtype: torch.dtype = torch.float32
    ) -> list[torch.Tensor]:
        """Features of prepared images, each ``Tensor[C, Hc, Wc]`` of ``dtype``.

        Images are batched only with others of the same padded size, so an image's
        features never depend on its batch mates. ``dtype``: float32, or the feature
        store's float16 (the same values as float32 features cast on the host).
        """
        out: list[torch.Tensor | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, p in enumerate(prepared):
            groups[tuple(p.pixels.shape[1:])].append(i)
        for idxs in groups.values():
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start : start + self.batch_size]
                pixels = torch.stack([prepared[i].pixels for i in chunk], out=self._host_buffer(
                    (len(chunk), *prepared[chunk[0]].pixels.shape), prepared[chunk[0]].pixels.dtype))
                feats = self._forward(pixels, [prepared[i].size for i in chunk], project, dtype)
                for i, f in zip(chunk, feats):
                    out[i] = f
        return out  # type: ignore[return-value]

    def extract(self, images: Sequence[Image.Image | LazyImage], *, project: bool = True) -> list[FrameFeatures]:
        """Frame features at the frame scale of the preprocessing policy."""
        return self.extract_frames([self.prepare_frame(im) for im in images], project=project)

    def prepare_frame(self, image: Image.Image | LazyImage) -> tuple[Prepared, tuple[int, int]]:
        """A frame preprocessed at the frame scale, with its original ``(width, height)``:
        the CPU half of :meth:`extract`, which indexing runs on worker threads (decoding
        included, for a frame not decoded yet: :class:`~dtm_ops.media.LazyImage`)."""
        return self.preprocess(image), image.size

    def extract_frames(
        self,
        frames: Sequence[tuple[Prepared, tuple[int, int]]],
        *,
        project: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> list[FrameFeatures]:
        """Features of frames made by :meth:`prepare_frame` (``dtype``: see :meth:`extract_prepared`)."""
        feats = self.extract_prepared([p for p, _ in frames], project=project, dtype=dtype)
        return [
            FrameFeatures(features=f, valid=self.valid_cells(p.size), scale=p.scale, size=size)
            for f, (p, size) in zip(feats, frames)
        ]
