"""The benchmarks' shared rules: a time is the best of ``repeat`` runs (this machine is noisy;
the best run is the one least disturbed by the machine's other work), every table names
the machine that gave it (:func:`machine`): the CPUs lent to this project differ from one
session to the next, and so do their ratios; and the matcher's method picks are timed in
the benchmark's own process, not read from the machine's picks file."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from dtm_ops.machine import cpu_model

# Every benchmark times the matcher's method picks itself: a picks file that earlier
# processes left on this machine (dtm_ops.picks) may hold picks timed under other load (a
# pick timed while tests ran beside it read 0.68x of the best method for 16 templates), and
# a table must not depend on what ran before it. A DTM_PICK_CACHE set by the caller wins
# (bench_picks.py sets it for the scans it compares).
os.environ.setdefault("DTM_PICK_CACHE", "off")


def best_of(fn: Callable[[], object], repeat: int, sync: Callable[[], None] | None = None, *,
            warm_up: bool = False) -> float:
    """Seconds of the fastest of ``repeat`` calls of ``fn``. ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before the clock starts and before it stops;
    ``warm_up`` runs ``fn`` once first, untimed (library set-up, kernel picks)."""
    sync = sync or (lambda: None)
    if warm_up:
        fn()
    best = float("inf")
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def machine(device: object = "cpu") -> str:
    """What gave the numbers, for a table's header and each JSON record: the GPU's name, or
    the CPU's model with its core count and torch's threads."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}; {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
