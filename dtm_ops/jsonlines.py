"""JSON Lines, one object per line: the format of query files and detector reports."""

from __future__ import annotations

import json
from collections.abc import Iterator


def iter_objects(text: str) -> Iterator[tuple[int, dict | None, str | None, str]]:
    """Yield ``(line number, object, problem, raw line)`` for each non-blank line: the
    object when the line is a JSON object, else ``None`` and what is wrong with it."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            yield n, None, f"not valid JSON ({exc.msg})", line
            continue
        if not isinstance(obj, dict):
            yield n, None, "not a JSON object", line
            continue
        yield n, obj, None, line
