"""Template scales: the default ladder, and scales given as text (``--scales``, the trigger
form). Light: no heavy import, so the form and the CLI read scales before torch loads.

A scale is the size of the object in a frame relative to its size in the query's ROI: 2
looks for the object twice as large (:mod:`dtm_ops.templates` builds one template each).
"""

from __future__ import annotations

import math

from dtm_ops.errors import InputError

#: 0.25x to 8x in steps of sqrt(2): wide enough for a pedestrian covering 0.5% of one
#: frame and a quarter of another.
DEFAULT_SCALES: tuple[float, ...] = tuple(round(2 ** (k / 2), 4) for k in range(-4, 7))


def parse_scales(text: str, *, source: str, field: str = "scales") -> tuple[float, ...]:
    """``"0.5,1,2"`` as ``(0.5, 1.0, 2.0)``: positive finite numbers, at least one. Anything
    else raises :class:`InputError` naming ``source`` and ``field``."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) and v > 0 for v in values):
        raise InputError(f"expected positive numbers like 0.5,1,2, got {text!r}", source=source, field=field)
    return values
