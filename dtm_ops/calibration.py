"""Calibrating template scores so that templates of different sizes compare.

The best position of a one-cell template scores higher by chance than that of a larger
template (a mean over fewer cells varies more), so the raw best cosine favours small
scales everywhere. Each template's scores are therefore standardised against their own
distribution over a sample of frames: ``z = (cosine - mu) / sigma`` where ``mu`` and
``sigma`` are the mean and standard deviation of the template's scores over every allowed
position of the sample frames. Nearly all positions are background, so ``z`` says how
far above background a match stands, in units of that template's own spread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from dtm_ops.matching import patchwise_cosine
from dtm_ops.templates import Template

MIN_SIGMA = 1e-3


def calibrate(
    templates: Sequence[Template], batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device | None = None
) -> int:
    """Set ``mu`` and ``sigma`` of every template from sample frames; returns the frame count.

    Args:
        batches: ``(features Tensor[N, C, H, W], valid Tensor[N, 2])`` of sample frames.
    """
    if not templates:
        return 0
    k = len(templates)
    total = torch.zeros(k, dtype=torch.float64)
    total_sq = torch.zeros(k, dtype=torch.float64)
    count = torch.zeros(k, dtype=torch.float64)
    frames = 0
    tfeats = [t.features.to(device) if device else t.features for t in templates]
    for features, valid in batches:
        if device is not None:
            features, valid = features.to(device), valid.to(device)
        frames += features.shape[0]
        for i, smap in enumerate(patchwise_cosine(features, tfeats, valid)):
            ok = torch.isfinite(smap)
            vals = smap[ok].double()
            total[i] += vals.sum().cpu()
            total_sq[i] += (vals * vals).sum().cpu()
            count[i] += ok.sum().cpu()
    for i, t in enumerate(templates):
        n = count[i].item()
        if n < 2:
            t.mu, t.sigma = 0.0, 1.0
            continue
        mu = total[i].item() / n
        var = max(total_sq[i].item() / n - mu * mu, 0.0)
        t.mu, t.sigma = mu, max(var**0.5, MIN_SIGMA)
    return frames
