"""Retrieval metrics over one query's ranking.

A ranking is a list of ``(frame_id, box or None)``, best first, over the query's candidate
frames (see :meth:`EvalSet.candidates`). ``relevant`` is the set of candidate frames that
hold an object of the query's class.
"""

from __future__ import annotations

from collections.abc import Sequence

from dtm_ops.boxes import box_iou

KS = (10, 50, 100)


def precision_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of the first ``k`` places that hold a relevant frame (a list shorter than ``k``
    counts its missing places as misses)."""
    return sum(1 for f in ranked[:k] if f in relevant) / k


def average_precision(ranked: Sequence[str], relevant: set[str]) -> float:
    """Mean, over the relevant frames, of the precision at the rank where each is found
    (0 for one never ranked). ``nan`` when nothing is relevant."""
    if not relevant:
        return float("nan")
    hits, total = 0, 0.0
    for i, f in enumerate(ranked, 1):
        if f in relevant:
            hits += 1
            total += hits / i
    return total / len(relevant)


def localisation(ranked: Sequence[tuple[str, Sequence[float] | None]], gt: dict[str, list[Sequence[float]]],
                 k: int = 50, iou: float = 0.5) -> tuple[int, int]:
    """(well placed, relevant) among the first ``k`` hits: a relevant hit is well placed when
    its box has IoU >= ``iou`` with a ground-truth box of the query's class in that frame.
    ``gt``: boxes of the query's class per relevant frame."""
    good = total = 0
    for fid, box in ranked[:k]:
        if fid in gt:
            total += 1
            good += box is not None and any(box_iou(box, g) >= iou for g in gt[fid])
    return good, total
