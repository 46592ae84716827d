"""Slow, obviously-correct references (numpy, explicit loops) for the tests."""

from __future__ import annotations

import numpy as np


def patchwise_cosine_loop(features: np.ndarray, template: np.ndarray, valid: tuple[int, int]) -> np.ndarray:
    """Similarity map of one template over one frame, straight from the definition.

    ``features[C, H, W]``, ``template[C, h, w]``; top-left corner ``(i, j)`` from
    ``(-(h//2), -(w//2))`` on, allowed when at least ceil(h/2) template rows and ceil(w/2)
    columns fall on the valid cells; cells off the valid region count 0; the mean divides
    by ``h * w``. Returns ``[oh, ow]`` with ``-inf`` where the position is not allowed.
    """
    C, H, W = features.shape
    _, h, w = template.shape
    ph, pw = h // 2, w // 2
    hv, wv = valid
    oh, ow = H - h + 1 + 2 * ph, W - w + 1 + 2 * pw
    out = np.full((oh, ow), -np.inf, dtype=np.float64)
    for a in range(oh):
        for b in range(ow):
            i, j = a - ph, b - pw
            rows_on = sum(1 for u in range(h) if 0 <= i + u < hv)
            cols_on = sum(1 for v in range(w) if 0 <= j + v < wv)
            if rows_on < (h + 1) // 2 or cols_on < (w + 1) // 2:
                continue
            total = 0.0
            for u in range(h):
                for v in range(w):
                    y, x = i + u, j + v
                    if 0 <= y < hv and 0 <= x < wv:
                        dot = 0.0
                        for ch in range(C):
                            dot += float(template[ch, u, v]) * float(features[ch, y, x])
                        total += dot
            out[a, b] = total / (h * w)
    return out


def unit_cells(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Random features, unit-norm along axis 0 (channels)."""
    x = rng.standard_normal(shape)
    return x / np.linalg.norm(x, axis=0, keepdims=True)
