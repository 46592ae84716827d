"""Writing local files whole or not at all."""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

#: The temporary name :func:`atomic_write` writes ``<name>`` under, before renaming it.
_TEMPORARY = re.compile(r"\..+\.[0-9a-f]{32}\.tmp")


def is_temporary(name: str) -> bool:
    """Whether a file name is one of :func:`atomic_write`'s temporary names (a writer killed
    between its write and its rename leaves one behind)."""
    return _TEMPORARY.fullmatch(name) is not None


class FileExists(FileExistsError):
    """An exclusive write found the name taken."""


def atomic_write(path: str | os.PathLike, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to a temporary name in the same folder, then rename (or, with
    ``exclusive``, hard-link, which fails if ``path`` exists): never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FileExists(str(path)) from None
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
