"""The demo's queries scanned with the default settings: the engine against itself without
the spectral method, side by side in one run.

Real features and real queries rather than random ones: the demo lake indexed by ``make
demo`` (EfficientNet-Lite0 ``block_s16``), the sample report's valid records as queries,
every default scale that fits (``dtm_ops.scales.DEFAULT_SCALES``), calibrated as a
search does. Two ways, best of ``--repeat`` each:

- engine: :meth:`dtm_ops.search.Searcher.scan` as it runs (``best_matches`` with
  ``method="auto"``, which weighs the spectral method for the whole set of templates);
- per size group: the same scan with each batch matched one size group at a time, the
  fastest method per group (the engine before ``dtm_ops.spectral``).

Both top-k lists are compared (frames, order, largest score difference).

    make demo   # once: builds demo-output/
    .venv/bin/python benchmarks/bench_demo_scan.py [--features demo-output/features]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dtm_ops import matching, search
from dtm_ops.errors import InputError
from dtm_ops.indexing import extractor_for_store
from dtm_ops.search import Query, Searcher
from dtm_ops.store import FeatureStore
from timing import machine

REPO = Path(__file__).resolve().parents[1]


def by_groups(features: torch.Tensor, templates, valid=None):
    """``best_matches`` one size group at a time (never the spectral method)."""
    return matching._best_by_groups(features, templates, valid, matching.MAX_PRODUCT_BYTES, "auto")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default=str(REPO / "demo-output" / "features"))
    ap.add_argument("--reports", default=str(REPO / "demo-output" / "reports" / "sample.jsonl"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write one JSON line per measurement here")
    a = ap.parse_args()
    store = FeatureStore.open(a.features)
    searcher = Searcher(extractor_for_store(store), progress=False)
    queries = []
    for line in Path(a.reports).read_text().splitlines():
        r = json.loads(line)
        q = Query(query_id=r["report_id"], source=r["frame_uri"], boxes=[tuple(b) for b in r["boxes"]])
        try:
            searcher.prepare([q], store)
        except InputError as exc:  # the sample holds a record the workflow quarantines
            print(f"not a query: {exc}")
            continue
        queries.append(q)
    prepared = searcher.prepare(queries, store)
    frames = store.manifest().frame_count
    print(f"{machine(searcher.device)}: {frames} frames of {store.manifest().fingerprint.channels} channels")
    for p in prepared:
        sizes = sorted({tuple(t.features.shape[1:]) for t in p.templates})
        print(f"  {p.query.query_id}: {len(p.templates)} templates, sizes {sizes}")

    def timed():
        best, heaps = float("inf"), None
        for _ in range(a.repeat + 1):  # the first run includes the one-time method picks
            start = time.perf_counter()
            heaps = searcher.scan(store, prepared)
            best = min(best, time.perf_counter() - start)
        return best, heaps

    t_engine, engine = timed()
    picks = sorted(matching.set_picks([t.features for p in prepared for t in p.templates]))
    real = search.best_matches
    search.best_matches = by_groups
    try:
        t_groups, groups = timed()
    finally:
        search.best_matches = real
    print(f"engine (auto; whole-set pick: {', '.join(picks) or 'not weighed'}): {frames / t_engine:8.0f} frames/s")
    print(f"per size group                        : {frames / t_groups:8.0f} frames/s   engine / this = "
          f"{t_groups / t_engine:.2f}")
    for q in engine:
        ea, ga = engine[q].items(), groups[q].items()
        same = [x[1] for x in ea] == [x[1] for x in ga]
        diff = max((abs(x[0] - y[0]) for x, y in zip(ea, ga)), default=0.0)
        print(f"  {q}: top {len(ea)} {'the same frames in the same order' if same else 'DIFFER'}, "
              f"calibrated scores within {diff:.1e}")
    if a.json:
        with open(a.json, "a") as out:
            out.write(json.dumps({"kind": "demo_scan", "device": machine(searcher.device), "frames": frames,
                                  "engine_fps": frames / t_engine, "groups_fps": frames / t_groups,
                                  "picks": picks}) + "\n")


if __name__ == "__main__":
    main()
