"""Pixel boxes and their mapping onto a feature grid.

Boxes are ``(x1, y1, x2, y2)`` in pixels of the image they refer to, with
``0 <= x1 < x2 <= width`` and ``0 <= y1 < y2 <= height`` (pixel edges, not centres).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dtm_ops.errors import InputError

Box = tuple[float, float, float, float]

#: Detector boxes often overshoot the frame by a fraction of a pixel; up to this many
#: pixels outside the image are clipped, anything further is an error.
BORDER_TOLERANCE_PX = 2.0


def parse_box(text: str, *, source: str | None = None, record: object = None, field: str = "box") -> Box:
    """Parse ``"x1,y1,x2,y2"`` into a box (not yet checked against an image)."""
    parts = [p.strip() for p in str(text).split(",")]
    if len(parts) != 4:
        raise InputError(f"expected 'x1,y1,x2,y2', got {text!r}", source=source, record=record, field=field)
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise InputError(f"expected four numbers, got {text!r}", source=source, record=record, field=field) from None
    return values  # type: ignore[return-value]


def validate_box(
    box: Sequence[float],
    width: int,
    height: int,
    *,
    source: str | None = None,
    record: object = None,
    field: str = "box",
) -> Box:
    """Check a box against an image of ``width x height`` pixels and return it clipped.

    Raises :class:`InputError` for a box that is not four finite numbers, is empty or
    inverted, or lies more than :data:`BORDER_TOLERANCE_PX` outside the image.
    """
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"expected four numbers, got {box!r}", source=source, record=record, field=field) from None
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise InputError(f"box has a non-finite coordinate: {box!r}", source=source, record=record, field=field)
    if x2 <= x1 or y2 <= y1:
        raise InputError(
            f"box is empty or inverted (need x1 < x2 and y1 < y2): {box!r}", source=source, record=record, field=field
        )
    tol = BORDER_TOLERANCE_PX
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise InputError(
            f"box {box!r} lies outside the {width}x{height} image", source=source, record=record, field=field
        )
    clipped = (max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2))
    if clipped[2] - clipped[0] < 1.0 or clipped[3] - clipped[1] < 1.0:
        raise InputError(
            f"box {box!r} is less than one pixel inside the {width}x{height} image",
            source=source,
            record=record,
            field=field,
        )
    return clipped


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_to_cells(box: Sequence[float], stride: int, grid_h: int, grid_w: int) -> tuple[int, int, int, int]:
    """Cells of a feature grid that a box covers, as ``(row0, col0, rows, cols)``.

    Cell ``(i, j)`` covers pixels ``[j*stride, (j+1)*stride) x [i*stride, (i+1)*stride)``.
    Rounding rule: a cell belongs to the box when its centre lies inside the box. A box
    too small to contain any centre gets the single cell that holds the box's centre, so
    every box maps to at least 1x1 cells. The result is clipped to the grid.

    Example (stride 32): x from 40 to 100 covers the centres 48 and 80, so columns 1-2;
    x from 40 to 60 contains no centre and gets column 1 (its centre, 50, lies in it).
    """

    def span(lo: float, hi: float, n: int) -> tuple[int, int]:
        first = max(math.ceil(lo / stride - 0.5), 0)
        last = min(math.floor(hi / stride - 0.5), n - 1)
        if last < first:  # no centre inside: the cell holding the box's centre
            first = last = int(min(max((lo + hi) / 2 // stride, 0), n - 1))
        return first, last - first + 1

    r0, rows = span(box[1], box[3], grid_h)
    c0, cols = span(box[0], box[2], grid_w)
    return r0, c0, rows, cols
