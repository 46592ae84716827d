"""Heat maps: where in a frame a template matches, drawn over the frame with the best box."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from dtm_ops.boxes import Box

# A perceptual dark-to-bright ramp (black, purple, orange, yellow) for the overlay.
_RAMP = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=np.float32)


def cell_heat(smap: torch.Tensor, template: tuple[int, int]) -> torch.Tensor:
    """Per-cell heat from a similarity map: the best score of any position covering the cell.

    Args:
        smap (Tensor[oh, ow]): a map from :func:`dtm_ops.matching.patchwise_cosine`.
        template: its template's ``(h, w)``.

    Returns:
        Tensor[H, W] over the frame's grid (``-inf`` where no allowed position covers a cell).
    """
    h, w = template
    ph, pw = h - 1 - h // 2, w - 1 - w // 2
    x = torch.nn.functional.pad(smap[None, None].float(), (pw, pw, ph, ph), value=float("-inf"))
    return torch.nn.functional.max_pool2d(x, (h, w), stride=1)[0, 0]


def colorize(values: np.ndarray) -> np.ndarray:
    """``values[H, W]`` in 0..1 -> ``uint8[H, W, 3]`` on the ramp."""
    pos = np.clip(values, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(_RAMP) - 2)
    frac = (pos - lo)[..., None]
    return (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)


#: :func:`colorize` of the 256 levels ``k / 255`` (float32), ``uint8[256, 3]``: the overlay's
#: heat is 8-bit, so a lookup gives the same colours as :func:`colorize` without its
#: float64 passes over every pixel (18 ms of a 768x576 overlay).
_LEVELS = colorize(np.arange(256, dtype=np.float32) / 255)


def overlay(
    image: Image.Image,
    heat: torch.Tensor | None,
    *,
    stride: int,
    scale: float,
    boxes: Sequence[Box] = (),
    label: str | None = None,
    alpha: float = 0.55,
) -> Image.Image:
    """Draw ``heat`` (Tensor[H, W] over the frame's cells) and ``boxes`` over ``image``.

    Cell ``(i, j)`` covers original pixels ``[j, j+1) * stride / scale`` (likewise rows).
    Heat is shown from 0 (background level) to its maximum; negative heat is transparent.
    """
    out = image.convert("RGB")
    if heat is not None:
        h = heat.clone().numpy().astype(np.float32)
        h[~np.isfinite(h)] = 0
        top = max(float(h.max()), 1e-6)
        norm = np.clip(h / top, 0, 1)
        cell = stride / scale
        size = (max(1, round(norm.shape[1] * cell)), max(1, round(norm.shape[0] * cell)))
        big = np.asarray(Image.fromarray((norm * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR))
        big = big[: out.size[1], : out.size[0]]
        level = np.zeros((out.size[1], out.size[0]), np.uint8)
        level[: big.shape[0], : big.shape[1]] = big
        rgb = np.asarray(out, dtype=np.float32)
        a = (alpha * (level.astype(np.float32) / 255))[..., None]
        rgb = rgb * (1 - a) + _LEVELS[level].astype(np.float32) * a
        out = Image.fromarray(rgb.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for b in boxes:
        draw.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=(0, 255, 90), width=max(2, out.size[0] // 320))
    if label:
        draw.rectangle([0, 0, 8 + 7 * len(label), 16], fill=(0, 0, 0))
        draw.text((4, 2), label, fill=(255, 255, 255))
    return out
