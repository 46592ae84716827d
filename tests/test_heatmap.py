"""Heat-map drawing (dtm_ops.heatmap) against its definition."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from dtm_ops.heatmap import colorize, overlay


def test_overlay_blends_each_pixel_with_the_ramp_colour_of_its_heat():
    """The overlay looks its colours up by 8-bit heat level; each pixel must equal the
    frame blended with :func:`colorize` of that pixel's heat, computed pixel by pixel here."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (72, 100, 3), dtype=np.uint8))
    heat = torch.from_numpy(rng.normal(size=(5, 7)).astype(np.float32))
    heat[0, 0] = float("-inf")  # no allowed position covers the cell
    got = np.asarray(overlay(image, heat, stride=16, scale=1.0))

    h = heat.numpy().copy()
    h[~np.isfinite(h)] = 0
    norm = np.clip(h / h.max(), 0, 1)
    cells = Image.fromarray((norm * 255).astype(np.uint8)).resize((7 * 16, 5 * 16), Image.Resampling.BILINEAR)
    level = np.asarray(cells)[:72, :100].astype(np.float32) / 255  # 5x7 cells of 16 px cover 80x112 px
    frame = np.asarray(image, dtype=np.float32)
    want = np.empty_like(frame)
    for y in range(72):
        for x in range(100):
            a = 0.55 * level[y, x]
            want[y, x] = frame[y, x] * (1 - a) + colorize(level[y : y + 1, x : x + 1])[0, 0].astype(np.float32) * a
    want = want.clip(0, 255).astype(np.uint8)
    assert np.array_equal(got, want)
    assert (got != np.asarray(image)).any(axis=2).mean() > 0.5  # the heat is drawn
