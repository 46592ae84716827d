"""The retrieval methods compared: Deep Template Matching and the pooled-feature baselines.

Every method maps a query to a score per lake frame (higher is better); DTM also gives a
box per frame.

- ``dtm``: :class:`~dtm_ops.search.Searcher` over the feature store (the product's path).
- ``global-avg`` / ``global-gem``: the paper's baseline. The backbone's final-layer
  (``head``) map of each frame pooled to one vector (average, or generalised mean with
  p = 3), against the query frame's vector: whole-image semantics.
- ``roi-pooled``: the query ROI cropped and embedded alone (final layer, average-pooled)
  against each frame's pooled vector: object semantics, no place.
- ``roi>dtm``: the ``roi-pooled`` shortlist (first ``shortlist`` frames) re-ranked by DTM.
- ``dtm+roi``: the sum of both scores, each standardised over the query's frames.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from dtm_ops.features import FeatureExtractor, FrameFeatures

GEM_P = 3.0


def pooled(ff: FrameFeatures) -> tuple[torch.Tensor, torch.Tensor]:
    """Average- and GeM-pooled vectors of a frame's valid cells, unit norm.

    Args:
        ff.features (Tensor[C, H, W]); ``ff.valid`` (h, w) bounds the cells that are image.
    Returns:
        (Tensor[C], Tensor[C])
    """
    h, w = ff.valid
    cells = ff.features[:, :h, :w].float().flatten(1)  # [C, h*w]
    avg = cells.mean(1)
    gem = cells.clamp(min=1e-6).pow(GEM_P).mean(1).pow(1 / GEM_P)
    return torch.nn.functional.normalize(avg, dim=0), torch.nn.functional.normalize(gem, dim=0)


def embed_frames(extractor: FeatureExtractor, images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled vectors of images: (Tensor[N, C] average, Tensor[N, C] GeM)."""
    avgs, gems = [], []
    for start in range(0, len(images), extractor.batch_size):
        for ff in extractor.extract(list(images[start : start + extractor.batch_size]), project=False):
            a, g = pooled(ff)
            avgs.append(a)
            gems.append(g)
    return torch.stack(avgs), torch.stack(gems)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """Tensor[N] -> zero mean, unit spread (robust: median and MAD)."""
    med = x.median()
    mad = (x - med).abs().median().clamp(min=1e-6) * 1.4826
    return (x - med) / mad


def rerank(first: torch.Tensor, second: torch.Tensor, shortlist: int) -> torch.Tensor:
    """Scores that put the top ``shortlist`` frames by ``first`` ahead, ordered by ``second``,
    then the rest in ``first``'s order. Tensor[N] each."""
    order = torch.argsort(first, descending=True)
    out = torch.empty_like(first)
    n = first.numel()
    top = order[:shortlist]
    # shortlisted: 2n + rank by second (descending); the rest: n - position in first's order
    sec_rank = torch.argsort(torch.argsort(second[top], descending=True))
    out[top] = 2.0 * n - sec_rank.to(first.dtype)
    rest = order[shortlist:]
    out[rest] = n - torch.arange(rest.numel(), dtype=first.dtype)
    return out
