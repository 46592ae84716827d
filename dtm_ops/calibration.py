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

A template's own sequence is left out of its sample (``skip``): the failure frame's
sequence is the likeliest to hold the very object (a parked van in a static camera's
footage is in most of its frames), and then the "background" statistics would be the
object's own scores. Measured in README "Retrieval quality".
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
    batches: Iterable[tuple],
    device: torch.device | None = None,
    skip: Sequence[str | None] | None = None,
) -> int:
    """Set ``mu`` and ``sigma`` of every template from sample frames; returns the frame count.

    Args:
        batches: ``(features Tensor[N, C, H, W], valid Tensor[N, 2])`` of sample frames, or
            ``(features, valid, sequences)`` with each frame's sequence id.
        skip: per template, a sequence whose frames do not count for it (or ``None``). A
            template left with fewer than 8 frames uses them all.
    """
    if not templates:
        return 0
    tfeats = [t.features.to(device) if device else t.features for t in templates]
    # per template, per sample frame: best score, and sum / sum of squares / count over positions
    best: list[list[torch.Tensor]] = [[] for _ in templates]
    psum: list[list[torch.Tensor]] = [[] for _ in templates]
    psq: list[list[torch.Tensor]] = [[] for _ in templates]
    pn: list[list[torch.Tensor]] = [[] for _ in templates]
    seqs: list[str | None] = []
    for batch in batches:
        features, valid = batch[0], batch[1]
        seqs += list(batch[2]) if len(batch) > 2 else [None] * features.shape[0]
        if device is not None:
            features, valid = features.to(device), valid.to(device)
        for i, smap in enumerate(patchwise_cosine(features, tfeats, valid)):
            score, _, _ = best_positions(smap)
            best[i].append(score.double().cpu())
            fin = torch.isfinite(smap)
            vals = torch.where(fin, smap, torch.zeros_like(smap)).double()
            psum[i].append(vals.sum((1, 2)).cpu())
            psq[i].append((vals * vals).sum((1, 2)).cpu())
            pn[i].append(fin.sum((1, 2)).double().cpu())
    masks: dict[str | None, torch.Tensor] = {}  # sample frames that count, per skipped sequence
    for own in set(skip or [None]):
        use = torch.tensor([own is None or q != own for q in seqs], dtype=torch.bool)
        masks[own] = use if int(use.sum()) >= 8 else torch.ones(len(seqs), dtype=torch.bool)  # too few: all
    for i, t in enumerate(templates):
        if not best[i]:
            t.mu, t.sigma = 0.0, 1.0
            continue
        use = masks[skip[i] if skip is not None else None]
        s = torch.cat(best[i])[use]
        s = s[torch.isfinite(s)]
        if s.numel() < 2:
            t.mu, t.sigma = 0.0, 1.0
            continue
        med = s.median().item()
        mad = (s - med).abs().median().item()
        n = max(torch.cat(pn[i])[use].sum().item(), 1.0)
        mean = torch.cat(psum[i])[use].sum().item() / n
        pos_sd = max(torch.cat(psq[i])[use].sum().item() / n - mean**2, 0.0) ** 0.5
        t.mu, t.sigma = med, max(1.4826 * mad, pos_sd, MIN_SIGMA)
    return len(seqs)
