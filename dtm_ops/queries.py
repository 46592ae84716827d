"""Query files: one JSON object per line.

    {"id": "q1", "image": "frames/000123.jpg", "boxes": [[x1, y1, x2, y2], ...],
     "labels": ["bicycle", ...], "mode": "any"}

``image`` is an image path or ``VIDEO#frame=N``, relative paths resolved against the
query file's folder; ``labels`` and ``mode`` (``any`` / ``all``) are optional.
"""

from __future__ import annotations

import os
from pathlib import Path

from dtm_ops.errors import InputError
from dtm_ops.jsonlines import iter_objects
from dtm_ops.search import Query


def _resolve(image: str, base: Path) -> str:
    path, sep, frag = image.partition("#")
    if not os.path.isabs(path):
        path = str(base / path)
    return path + sep + frag


def read_queries(path: str | os.PathLike) -> list[Query]:
    """Parse a query file; errors name the file, the line and the field."""
    src = str(path)
    if not os.path.isfile(src):
        raise InputError("query file not found", source=src)
    base = Path(src).parent
    queries = []
    with open(src, encoding="utf-8") as f:
        text = f.read()
    for line_no, obj, problem, _ in iter_objects(text):
        rec = f"line {line_no}"
        if obj is None:
            raise InputError(problem, source=src, record=rec)
        for key in ("image", "boxes"):
            if key not in obj:
                raise InputError("missing", source=src, record=rec, field=key)
        boxes = obj["boxes"]
        if not isinstance(boxes, list) or not boxes:
            raise InputError("expected a non-empty list of [x1, y1, x2, y2]", source=src, record=rec, field="boxes")
        for i, b in enumerate(boxes):
            if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
                raise InputError(f"expected [x1, y1, x2, y2], got {b!r}", source=src, record=rec, field=f"boxes[{i}]")
        labels = obj.get("labels") or []
        try:
            queries.append(
                Query(
                    query_id=str(obj.get("id", f"q{line_no}")),
                    source=_resolve(str(obj["image"]), base),
                    boxes=[tuple(float(v) for v in b) for b in boxes],
                    labels=list(labels),
                    mode=obj.get("mode", "any"),
                )
            )
        except InputError as exc:
            raise InputError(exc.reason, source=src, record=rec, field=exc.field) from None
    if not queries:
        raise InputError("query file holds no queries", source=src)
    return queries
