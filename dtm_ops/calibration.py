"""Calibrating template scores so that templates of different sizes compare.

A frame's score for a template is its *best* position, and that maximum behaves very
differently by template size: the best position of a one- or two-cell template scores
high by chance (a mean over few cells varies a lot), while a large template's scores
concentrate near their mean. So raw cosines favour small scales, and standardising by the
spread over *positions* over-rewards large templates (their spread is tiny).

We therefore calibrate the statistic we rank by. For each template, over a sample of
frames, we collect each frame's best score and the scores of all allowed positions, and

    z = (best cosine - median of per-frame bests) / sigma
    sigma = max(1.4826 * MAD of per-frame bests, std over positions, MIN_SIGMA)

The median and MAD ignore a minority of sample frames that do hold the object. The spread
of the per-frame bests alone collapses in a static scene (the same background spot is the
best in every frame), where a tiny template would then win on noise; the spread over
positions keeps it honest there. The spread over positions alone is tiny for large
templates, which would then win on any scene-wide shift; the per-frame term covers that.
Measured on the demo footage and planted objects (README, "Calibration").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from dtm_ops.matching import best_positions, patchwise_cosine
from dtm_ops.templates import Template

#: Smallest spread used, in cosine units: differences below this are noise.
MIN_SIGMA = 0.02


def calibrate(
    templates: Sequence[Template],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | None = None,
) -> int:
    """Set ``mu`` and ``sigma`` of every template from sample frames; returns the frame count.

    Args:
        batches: ``(features Tensor[N, C, H, W], valid Tensor[N, 2])`` of sample frames.
    """
    if not templates:
        return 0
    tfeats = [t.features.to(device) if device else t.features for t in templates]
    best: list[list[torch.Tensor]] = [[] for _ in templates]
    pos_sum = torch.zeros(len(templates), dtype=torch.float64)
    pos_sq = torch.zeros(len(templates), dtype=torch.float64)
    pos_n = torch.zeros(len(templates), dtype=torch.float64)
    frames = 0
    for features, valid in batches:
        if device is not None:
            features, valid = features.to(device), valid.to(device)
        frames += features.shape[0]
        for i, smap in enumerate(patchwise_cosine(features, tfeats, valid)):
            score, _, _ = best_positions(smap)
            best[i].append(score.double().cpu())
            vals = smap[torch.isfinite(smap)].double()
            pos_sum[i] += vals.sum().cpu()
            pos_sq[i] += (vals * vals).sum().cpu()
            pos_n[i] += vals.numel()
    for i, (t, scores) in enumerate(zip(templates, best)):
        s = torch.cat(scores) if scores else torch.empty(0, dtype=torch.float64)
        s = s[torch.isfinite(s)]
        if s.numel() < 2:
            t.mu, t.sigma = 0.0, 1.0
            continue
        med = s.median().item()
        mad = (s - med).abs().median().item()
        n = max(pos_n[i].item(), 1.0)
        pos_sd = max(pos_sq[i].item() / n - (pos_sum[i].item() / n) ** 2, 0.0) ** 0.5
        t.mu, t.sigma = med, max(1.4826 * mad, pos_sd, MIN_SIGMA)
    return frames
