"""A mapped scan task's scan in a fresh process: the matcher's picks timed in it, or read from
the picks file an earlier task on the machine wrote (:mod:`dtm_ops.picks`), side by side.

A local feature store (``--frames``, shards of 256 and a smaller last one, as an indexing
run leaves them) is scanned by fresh processes, one :meth:`dtm_ops.search.Searcher.scan`
each, as a scan task runs it: with ``DTM_PICK_CACHE=off`` (every pick timed: what each
task paid before picks were kept) and with the file one earlier process filled,
alternately, ``--rounds`` times. The table gives the scan's seconds (the median of the
rounds), the timings the process ran, and the ratio. The process's start (imports) is not
in the time; the second scan of the same process, the picks all made, is: the floor.

    .venv/bin/python benchmarks/bench_picks.py [--frames 600] [--cases 1x1 1x9 16x9m 64x9m] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent


def child(store_uri: str, case: str, channels: int) -> None:
    """One scan task: print its first scan's seconds, the timings it ran, its second scan's."""
    import torch

    from bench_scan import queries
    from dtm_ops import matching
    from dtm_ops.search import Searcher
    from dtm_ops.store import FeatureStore
    from query_sets import parse_case

    runs = []
    timed = matching._timed
    matching._timed = lambda *a, **k: runs.append(1) or timed(*a, **k)
    store = FeatureStore.open(store_uri)
    searcher = Searcher(SimpleNamespace(device=torch.device("cpu"), stride=16), top_k=20)
    nq, ns, mixed = parse_case(case)
    prepared = queries(nq, ns, channels, False, mixed)
    out = []
    for _ in range(2):
        t = time.perf_counter()
        searcher.scan(store, prepared)
        out.append(time.perf_counter() - t)
    print(json.dumps({"first": out[0], "again": out[1], "timed": len(runs)}))


def run_child(store_uri: str, case: str, channels: int, cache: str) -> dict:
    env = {**os.environ, "DTM_PICK_CACHE": cache}
    out = subprocess.run([sys.executable, __file__, "--child", store_uri, "--cases", case, "--channels", str(channels)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=600)
    ap.add_argument("--channels", type=int, default=112)
    ap.add_argument("--grid", type=int, nargs=2, default=(30, 40))
    ap.add_argument("--cases", nargs="+", default=["1x1", "1x9", "16x9m", "64x9m"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write one JSON line per case here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.cases[0], a.channels)
    from bench_scan import fill
    from dtm_ops.store import FeatureStore
    from timing import machine

    uri = tempfile.mkdtemp(prefix="dtm-picks-store-")
    try:
        fill(FeatureStore.open(uri), a.frames, a.channels, tuple(a.grid), 256)
        compare(a, uri, machine())
    finally:
        shutil.rmtree(uri, ignore_errors=True)


def compare(a: argparse.Namespace, uri: str, name: str) -> None:
    """The table: each case's scan in fresh processes, picks timed against picks read."""
    print(f"{name}: a fresh process scans {a.frames} frames of {a.channels}x{a.grid[0]}x{a.grid[1]} "
          f"(shards of 256 and {a.frames % 256 or 256}) from a local folder; median of {a.rounds} rounds")
    print(f"  {'case':<8} {'picks timed':>22} {'picks read':>22} {'ratio':>6} {'2nd scan':>9}")
    log = open(a.json, "a") if a.json else None
    for case in a.cases:
        with tempfile.TemporaryDirectory(prefix="dtm-picks-") as cache:
            run_child(uri, case, a.channels, cache)  # the earlier task that keeps the picks
            off, on = [], []
            for _ in range(a.rounds):
                off.append(run_child(uri, case, a.channels, "off"))
                on.append(run_child(uri, case, a.channels, cache))
        t_off, t_on = (statistics.median(r["first"] for r in rs) for rs in (off, on))
        again = statistics.median(r["again"] for r in off + on)
        n_off, n_on = (max(r["timed"] for r in rs) for rs in (off, on))
        print(f"  {case:<8} {t_off:7.2f} s ({n_off:4d} timings) {t_on:7.2f} s ({n_on:4d} timings) "
              f"{t_off / t_on:5.2f}x {again:7.2f} s")
        if log:
            log.write(json.dumps({"kind": "picks", "device": name, "case": case, "frames": a.frames,
                                  "timed_s": [r["first"] for r in off], "read_s": [r["first"] for r in on],
                                  "second_scan_s": again, "timings": [n_off, n_on]}) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
