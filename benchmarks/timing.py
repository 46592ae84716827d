"""The one timing rule of the benchmarks: the best of ``repeat`` runs (this machine is noisy;
the best run is the one least disturbed by the machine's other work)."""

from __future__ import annotations

import time
from collections.abc import Callable


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
