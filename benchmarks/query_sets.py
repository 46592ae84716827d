"""Template sizes of the benchmarks' query sets: one ROI per query, at 1 to 9 scales.

:data:`SCALES` is one ROI's template sizes at 9 scales, 4x3 at scale 1 first. A set of
queries that all have that ROI holds only 9 distinct sizes, however many queries it has. A
day's real queries do not: every ROI has a shape of its own, and its scales are sizes no
other query has. The matcher's cost depends on that (its direct methods work per size, its
spectral method on all sizes at once), so with ``mixed`` each query's ROI has a shape and
size of its own: :data:`SCALES` with every height / width times one factor and every area
times another, each from 0.5 to 2 (log-uniform, fixed seed). Such a set has many distinct
sizes (``16x9m``: 83, with 1.23 times the single-shape set's total template area; ``64x9m``:
176 sizes, 1.13 times the area).

A case is named ``QxS`` (``Q`` queries at ``S`` scales) or ``QxSm`` (mixed shapes).
"""

from __future__ import annotations

import math
import random

SCALES = [(4, 3), (2, 1), (3, 2), (6, 4), (8, 6), (11, 8), (12, 9), (14, 10), (16, 12)]  # one ROI; the first n


def template_sizes(queries: int, scales: int, mixed: bool = False, seed: int = 0) -> list[list[tuple[int, int]]]:
    """Per query, its ``scales`` template sizes ``(h, w)``: :data:`SCALES`'s first ones, or
    with ``mixed`` the same areas at the query's own aspect ratio (see the module's
    docstring)."""
    if not 1 <= scales <= len(SCALES):
        raise ValueError(f"scales must be 1 to {len(SCALES)}, got {scales}")
    rng = random.Random(seed)
    out = []
    for _ in range(queries):
        if not mixed:
            out.append(SCALES[:scales])
            continue
        k = math.exp(rng.uniform(-math.log(2), math.log(2)) / 2)  # h / w times k * k
        a = math.exp(rng.uniform(-math.log(2), math.log(2)) / 2)  # h * w times a * a
        out.append([(max(1, round(h * a * k)), max(1, round(w * a / k))) for h, w in SCALES[:scales]])
    return out


def parse_case(case: str) -> tuple[int, int, bool]:
    """``"16x9"`` -> ``(16, 9, False)``; ``"16x9m"`` -> ``(16, 9, True)``."""
    mixed = case.endswith("m")
    try:
        q, s = map(int, case.removesuffix("m").split("x"))
    except ValueError:
        raise ValueError(f"a case is QUERIESxSCALES, with m at the end for mixed shapes, e.g. 16x9m; got {case!r}")
    return q, s, mixed


def case_label(queries: int, scales: int, mixed: bool) -> str:
    """``16 queries x 9 scales, mixed shapes``."""
    text = f"{queries} quer{'y' if queries == 1 else 'ies'} x {scales} scale{'s' if scales > 1 else ''}"
    return text + (", mixed shapes" if mixed else "")
