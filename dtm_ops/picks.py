"""The matcher's method picks, kept on disk from one process to the next.

``auto`` (:func:`dtm_ops.matching.best_matches`) times the methods on first use of each
template set and batch size and remembers the fastest, as cuDNN's benchmark mode does. In
memory only, every process pays for those timings again, and a mapped scan task is a
process of its own: on this project's 2-core CPU, a fresh process scanning 600 frames for
16 queries x 9 scales of mixed shapes took 3.9 s, of which 2.0 s were picks (the steps of
32 frames and the 24-frame tail each picked); one query x 9 scales, 1.3 s, of which 0.8 s.
So the picks are also written to a file that later processes read, as FFTW's wisdom or
Triton's autotuning cache are: a worker machine times each case once.

A pick is kept under its key (:func:`dtm_ops.matching._key`: what is matched, dtype, grid,
channels, template sizes, batch size bucket) and the machine it was timed on: the device
(CPU model and flags and torch's thread count, or the GPU's name and compute capability),
torch's version and this package's: a pick made on another machine, or by other versions,
is never used. A pick is timed again once it is older than :data:`MAX_AGE_S` (a week):
a pick timed while the machine was busy with other work may be wrong while it is not (one
ran at 0.68x of the best method, ``benchmarks/results/speed/xeon/matcher-cpu-stale-picks.txt``),
and the age bounds how long that lasts, for one timing a week per case. Delete the file to
time everything again now: after changing the matcher's code within a version, or where the
machine's load has changed for good.

``DTM_PICK_CACHE`` names the folder of the file (``picks.json``); by default
``$XDG_CACHE_HOME/dtm-ops``, or ``~/.cache/dtm-ops`` (none without a home folder); ``off``
keeps the picks in memory only.

The file is JSON, written whole (:func:`dtm_ops.fileio.atomic_write`) at the end of a
matcher call that picked, merged with what other processes wrote meanwhile, under a lock
(``picks.json.lock`` beside it) so that no process writes over another's picks; two
processes picking at once may each time a case, never corrupt the file or lose a pick; it
keeps the newest :data:`MAX_PICKS`. A file that cannot be read or written is reported
in the log (once a process) and the picks stay in memory: a scan never fails for its cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "DTM_PICK_CACHE"
FILE = "picks.json"
#: Format 2 keeps when each pick was timed; format 1 files (without) are read as timed long
#: ago, so their picks are timed again and the file rewritten.
FORMAT = 2
#: Seconds after which a kept pick is timed again.
MAX_AGE_S = 7 * 24 * 3600.0

#: Picks a file keeps: the newest. A day's queries bring new template sizes, hence new
#: keys, and the file is rewritten whole.
MAX_PICKS = 2000

_tables: dict[Path, dict[str, list]] = {}  # per file: what this process has read and written
_pending: set[Path] = set()  # files with picks not yet written
_warned: set[tuple[Path, str]] = set()


def path() -> Path | None:
    """The picks file as ``DTM_PICK_CACHE`` says, or ``None`` where it is ``off``, or where
    it is unset and there is no cache folder to default to (no home folder, as a service
    user may have none; a relative ``XDG_CACHE_HOME``, which the XDG spec says to ignore)."""
    raw = os.environ.get(ENV, "").strip()
    if raw.lower() == "off":
        return None
    if raw:
        return Path(raw).expanduser() / FILE
    cache = Path(os.environ.get("XDG_CACHE_HOME", "").strip())
    if not cache.is_absolute():
        cache = Path(os.path.expanduser("~")) / ".cache"  # "~" itself where there is no home
    return cache / "dtm-ops" / FILE if cache.is_absolute() else None


def recall(key: tuple) -> tuple[str, float] | None:
    """``(method, seconds)`` kept for ``key`` on this machine, or ``None`` (none, or timed
    more than :data:`MAX_AGE_S` ago)."""
    file = path()
    if file is None:
        return None
    got = _table(file).get(_entry(key))
    if not got or _now() - got[2] > MAX_AGE_S:
        return None
    return got[0], float(got[1])


def remember(key: tuple, method: str, seconds: float) -> None:
    """Keep ``method`` (which took ``seconds``) for ``key``: in memory now, in the file at the
    next :func:`flush`."""
    file = path()
    if file is None:
        return
    _table(file)[_entry(key)] = [method, seconds, round(_now(), 3)]
    _pending.add(file)


def _now() -> float:
    """Seconds since the epoch (a function, for tests)."""
    return time.time()


def flush() -> None:
    """Write the picks remembered since the last flush, merged with what other processes
    wrote meanwhile, keeping the newest :data:`MAX_PICKS`. The matcher calls it as each of
    its calls returns: once a call, however many groups it picked."""
    from dtm_ops.fileio import atomic_write

    while _pending:
        file = _pending.pop()
        table = _table(file)
        try:
            with _locked(file):  # no other process writes between our read and our write
                try:
                    merged = _read(file)
                except (OSError, ValueError):
                    merged = {}  # an unreadable file (reported when first read) is replaced
                for k, v in table.items():  # each key's latest timing, theirs or ours
                    if k not in merged or v[2] >= merged[k][2]:
                        merged[k] = v
                merged = dict(sorted(merged.items(), key=lambda kv: kv[1][2])[-MAX_PICKS:])  # the newest
                atomic_write(file, json.dumps({"format": FORMAT, "picks": merged}, indent=0).encode())
        except OSError as e:
            _warn(file, "write", f"cannot write {file} ({e}); the matcher's picks stay in memory")
        else:
            table.clear()
            table.update(merged)


@contextmanager
def _locked(file: Path) -> Iterator[None]:
    """Hold an exclusive lock (``flock``) on ``<file>.lock`` beside ``file``: processes that
    flush at once (the mapped scan tasks of one worker machine, or of workers sharing the
    folder) merge one after the other, so none writes over picks another wrote meanwhile.
    Where the file system refuses locks (some network mounts), the merge goes on unlocked,
    as it would without this: a lost pick is timed again, never a wrong result."""
    import fcntl

    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file.with_name(file.name + ".lock"), "ab") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        except OSError as e:
            _warn(file, "lock", f"cannot lock {file} ({e}); merging with other processes' picks unlocked")
        yield


def _table(file: Path) -> dict[str, list]:
    if file not in _tables:
        try:
            _tables[file] = _read(file)
        except (OSError, ValueError) as e:
            _warn(file, "read", f"cannot read {file} ({e}); picks are timed anew "
                  "(the file is rewritten on the next pick)")
            _tables[file] = {}
    return _tables[file]


def _read(file: Path) -> dict[str, list]:
    """The file's picks, each ``[method, seconds, timed at]`` (none where there is no file;
    format 1's, without the time, as timed at 0); ``ValueError`` where it is not a picks file
    of format 1 or 2."""
    try:
        doc = json.loads(file.read_bytes())
    except FileNotFoundError:
        return {}
    form = doc.get("format") if isinstance(doc, dict) else None
    picks = doc.get("picks") if form in (1, FORMAT) else None
    fields = 2 if form == 1 else 3
    if not isinstance(picks, dict) or not all(
        isinstance(v, list) and len(v) == fields and isinstance(v[0], str)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v[1:])
        for v in picks.values()
    ):
        claimed = form if form in (1, FORMAT) else f"1 or {FORMAT}"
        raise ValueError(f"not a picks file of format {claimed}")
    return {k: v if fields == 3 else [*v, 0.0] for k, v in picks.items()}


def _warn(file: Path, what: str, message: str) -> None:
    """Log ``message`` the first time ``what`` (read, write) fails for ``file``."""
    if (file, what) not in _warned:
        _warned.add((file, what))
        log.warning(message)


def _entry(key: tuple) -> str:
    """The file's name for ``key``: the key (its device type second) with the machine that
    timed it, as JSON text (dtypes by name, tuples as lists)."""
    import torch

    from dtm_ops import __version__

    return json.dumps([device(key[1]), f"torch {torch.__version__}", f"dtm-ops {__version__}", _plain(key)])


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


def device(kind: str) -> str:
    """What decides a pick's speed on this machine for a device type: the CPU (model, flags
    and torch's thread count) or the current GPU (name and compute capability)."""
    import torch

    if kind == "cuda":
        i = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(i)
        return f"cuda {torch.cuda.get_device_name(i)} sm{major}{minor}"
    from dtm_ops.machine import cpu_info, cpu_model

    flags = hashlib.sha256(cpu_info().get("flags", "").encode()).hexdigest()[:8]  # a VM may hide some
    return f"{kind} {cpu_model()} flags {flags} threads {torch.get_num_threads()}"
