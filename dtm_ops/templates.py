"""ROI -> templates: the query's feature cells under the box, at a range of scales.

Multi-scale by re-extraction: for scale ``s`` (the object is ``s`` times as large in the
frame as in the query) the query image is resized by ``s`` on top of the frame policy's
resize, and its features are extracted again. That is closer to how the object looks at
that size than resampling a feature patch. Only a window of the resized image around the
ROI is processed (at most the frames' long side on each side), so large scales cost no
more than one frame.

Scales are dropped where they make no sense: above 1, when the resized ROI would be
larger than a whole frame, or when the query image would be enlarged more than
``max_upsample`` times its own pixels (such a template is mostly interpolation: blur that
matches any smooth surface, measured in README "Retrieval quality"); below 1, when it
would be smaller than half a cell.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from dtm_ops.boxes import Box, box_to_cells
from dtm_ops.features import FeatureExtractor
from dtm_ops.scales import DEFAULT_SCALES

#: Largest enlargement of the query image's own pixels that a template may come from.
MAX_UPSAMPLE = 2.0


@dataclass
class Template:
    """One ROI of one query at one scale.

    Attributes:
        features (Tensor[C, h, w]): unit-norm per cell.
        rel_box: the ROI inside the template, in cells: ``(x1, y1, x2, y2)`` relative to the
            template's top-left corner (so the hit box at position ``(i, j)`` is
            ``((j + x1) * stride, (i + y1) * stride, ...)`` in resized frame pixels).
        mu, sigma: calibration (mean and spread of this template's scores on sample frames).
    """

    query_id: str
    roi_index: int
    scale: float
    features: torch.Tensor
    rel_box: tuple[float, float, float, float]
    mu: float = 0.0
    sigma: float = 1.0

    @property
    def size(self) -> tuple[int, int]:
        return int(self.features.shape[1]), int(self.features.shape[2])


def feasible_scales(box: Box, image_size: tuple[int, int], extractor: FeatureExtractor, scales: Sequence[float],
                    max_upsample: float = MAX_UPSAMPLE) -> list[float]:
    """The scales of ``scales`` worth matching for ``box`` (see module docstring)."""
    pre = extractor.preprocess
    f = pre.frame_scale(*image_size)
    bw, bh = box[2] - box[0], box[3] - box[1]
    keep = []
    for s in sorted(set(scales)):
        r = f * s
        if s > 1 and (max(bw, bh) * r > pre.long_side or r > max_upsample):
            continue
        if s < 1 and max(bw, bh) * r < extractor.stride / 2:
            continue
        keep.append(s)
    if not keep:  # every scale was out of range: keep the one nearest to 1
        keep = [min(scales, key=lambda s: abs(math.log(s)))]
    return keep


def build_templates(
    extractor: FeatureExtractor,
    image: Image.Image,
    boxes: Sequence[Box],
    *,
    query_id: str,
    scales: Sequence[float] = DEFAULT_SCALES,
    margin: int = 0,
    max_upsample: float = MAX_UPSAMPLE,
) -> list[Template]:
    """Templates of every ROI of one query at every feasible scale.

    Args:
        boxes: validated pixel boxes on ``image``.
        margin: context cells added on each side of the ROI's cells (clipped to the image).
        max_upsample: see the module docstring.
    """
    pre = extractor.preprocess
    stride = extractor.stride
    W, H = image.size
    f = pre.frame_scale(W, H)
    jobs = []  # (roi index, scale, prepared window, box in window pixels)
    for k, box in enumerate(boxes):
        for s in feasible_scales(box, image.size, extractor, scales, max_upsample):
            r = f * s
            win_w, win_h = min(W, pre.long_side / r), min(H, pre.long_side / r)
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            x0 = min(max(cx - win_w / 2, 0.0), W - win_w)
            y0 = min(max(cy - win_h / 2, 0.0), H - win_h)
            crop_box = (math.floor(x0), math.floor(y0), min(W, math.ceil(x0 + win_w)), min(H, math.ceil(y0 + win_h)))
            crop = image.crop(crop_box)
            prepared = pre(crop, scale=r)
            local = tuple((v - o) * r for v, o in zip(box, (crop_box[0], crop_box[1]) * 2))
            jobs.append((k, s, prepared, local))
    feats = extractor.extract_prepared([j[2] for j in jobs])
    templates = []
    for (k, s, prepared, local), fmap in zip(jobs, feats):
        rows, cols = extractor.valid_cells(prepared.size)
        r0, c0, h, w = box_to_cells(local, stride, rows, cols)
        r1, c1 = min(rows, r0 + h + margin), min(cols, c0 + w + margin)
        r0, c0 = max(0, r0 - margin), max(0, c0 - margin)
        t = fmap[:, r0:r1, c0:c1].contiguous()
        rel = (local[0] / stride - c0, local[1] / stride - r0, local[2] / stride - c0, local[3] / stride - r0)
        templates.append(Template(query_id=query_id, roi_index=k, scale=s, features=t, rel_box=rel))
    return templates
