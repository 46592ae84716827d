"""One preprocessing policy, shared by indexing (frames) and querying (templates).

Geometry only: resize keeping the aspect ratio so the long side is ``long_side`` pixels
(times a template scale when a query is re-extracted), then pad right and bottom to a
multiple of the backbone's largest stride. Intensity normalisation belongs to the
backbone. The policy is recorded in every feature set's fingerprint.

A frame not converted to RGB yet (:class:`dtm_ops.media.LazyImage`: how indexing reads
frames) is decoded at a reduced size where the resize at least halves it
(``reduced_decode``): a JPEG by its decoder's 1/2, 1/4 or 1/8 scaling, then the same
resize from there; a video frame by FFmpeg's scaler straight from the codec's pixels to
the resized size. The pixels differ from a full decode's by about one grey level on
average (a 1080p frame to 640x360), and decoding and resizing take half the time or less.
Frames resized by less than half (the demo lake's) are decoded in full either way.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from dtm_ops.media import LazyImage


@dataclass(frozen=True)
class Prepared:
    """An image made ready for a backbone.

    Attributes:
        pixels (Tensor[3, H, W]): RGB, uint8, padded with zeros (a quarter of float32's
            bytes to hold in loaders' queues and to copy to a GPU; the extractor converts).
        scale: resized size = original size * scale.
        size: ``(width, height)`` of the resized image before padding.
    """

    pixels: "torch.Tensor"
    scale: float
    size: tuple[int, int]


@dataclass(frozen=True)
class Preprocess:
    long_side: int = 640
    multiple: int = 32
    reduced_decode: bool = True

    def frame_scale(self, width: int, height: int) -> float:
        """Scale that brings an image's long side to ``long_side``."""
        return self.long_side / max(width, height)

    def __call__(self, image: "Image.Image | LazyImage", scale: float | None = None) -> Prepared:
        """Resize ``image`` by ``scale`` (default: :meth:`frame_scale`) and pad it.

        Resized size is ``round(width * scale) x round(height * scale)`` (at least 1x1),
        of the full image's size; the pad is zeros up to the next multiple of ``multiple``.
        A :class:`~dtm_ops.media.LazyImage` is decoded here (reduced: see the module).
        """
        import numpy as np
        import torch
        from PIL import Image

        from dtm_ops.media import LazyImage

        if scale is None:
            scale = self.frame_scale(*image.size)
        w = max(1, round(image.size[0] * scale))
        h = max(1, round(image.size[1] * scale))
        if isinstance(image, LazyImage):
            image = image.decode((w, h) if self.reduced_decode else None)
        resized = image if image.mode == "RGB" else image.convert("RGB")  # convert copies an RGB image
        if (w, h) != resized.size:
            resized = resized.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None)
        pw = math.ceil(w / self.multiple) * self.multiple
        ph = math.ceil(h / self.multiple) * self.multiple
        pixels = torch.zeros(3, ph, pw, dtype=torch.uint8)
        pixels[:, :h, :w] = torch.from_numpy(np.array(resized)).permute(2, 0, 1)
        return Prepared(pixels=pixels, scale=scale, size=(w, h))

    def to_dict(self) -> dict:
        """The policy for a fingerprint. Without ``reduced_decode`` where it is off: the
        policy before it existed, so feature sets indexed then keep their fingerprint."""
        d = asdict(self)
        if not self.reduced_decode:
            del d["reduced_decode"]
        return d
