"""End to end: the scan task's frames/s against the raw read throughput of the same shards.

A feature store is filled with unit-norm features (``--grid``, ``--channels``), then, in one
run, side by side:

- raw read: the shard objects' bytes fetched and nothing else, once one after the other,
  once with the store's parallelism (``workers`` whole-object GETs in flight) and once as
  the reader makes its GETs (ranged parts read in place into one buffer per shard); the
  fastest counts;
- scan: :meth:`dtm_ops.search.Searcher.scan` over every shard, which is what a mapped scan
  task runs: GETs, checksum, decode (worker threads), pinned host-to-device copies one batch
  ahead (CUDA), matching (after centring on the lake's mean cell with ``--center``), best
  position per frame and the top-k merge;
- matcher alone: the scan's per-batch work (matching, best positions) on features already in
  memory, so that the table shows which stage is the slowest;
- how busy the machine's cores are during the raw read: where the S3 server shares the
  machine, its work and the scan's compete for the same cores.

The store is the S3 server (Ceph RGW on 127.0.0.1, as in bench_store.py) when ``--s3``,
else a local folder. Target (issue 7): scan / raw read >= 0.8 where the read is the slowest
stage; with many templates on a CPU the matcher is slower than the read, and the table says
so. With ``--server-cpus`` the S3 server runs on those CPUs and the scan on the others, as it
would with the server on other machines; by default both share every core.

    .venv/bin/python benchmarks/bench_scan.py [--s3 [--server-cpus 0]] [--frames 2048] [--cases 1x1 1x9 16x9]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from dtm_ops import allocator, matching
from dtm_ops.fingerprint import Fingerprint
from dtm_ops.search import PreparedQuery, Query, Searcher
from dtm_ops.store import FeatureStore
from dtm_ops.store.feature_store import SHARDS, part_bytes
from dtm_ops.store.format import FrameEntry
from dtm_ops.templates import Template
from query_sets import case_label, parse_case, template_sizes
from timing import best_of, machine

REPO = Path(__file__).resolve().parents[1]


def fill(store: FeatureStore, frames: int, channels: int, grid: tuple[int, int], per_shard: int) -> None:
    fp = Fingerprint("bench", "random", "x", 16, channels)
    g = torch.Generator().manual_seed(0)
    for s in range(0, frames, per_shard):
        n = min(per_shard, frames - s)
        feats = F.normalize(torch.randn(n, channels, *grid, generator=g), dim=1)
        entries = [FrameEntry(f"f{s + i}", f"/lake/{s + i}.jpg", f"seq{(s + i) // 100}", s + i,
                              grid[1] * 16, grid[0] * 16, grid, 1.0) for i in range(n)]
        store.append(fp, entries, list(feats))


def queries(n: int, scales: int, channels: int, centred: bool = False, mixed: bool = False) -> list[PreparedQuery]:
    """Templates of ``n`` queries at ``scales`` sizes (``mixed``: each query's own shapes,
    :mod:`query_sets`); ``centred``: with a lake mean cell, as a run with mean-centred
    matching has (the scan then centres every batch)."""
    g = torch.Generator().manual_seed(1)
    lake_mean = F.normalize(torch.randn(channels, generator=g), dim=0) * 0.3 if centred else None
    out = []
    for q, query_sizes in enumerate(template_sizes(n, scales, mixed)):
        temps = [Template(f"q{q}", 0, 1.0, F.normalize(torch.randn(channels, h, w, generator=g), dim=0), (0, 0, w, h))
                 for h, w in query_sizes]
        out.append(PreparedQuery(Query(f"q{q}", f"/queries/{q}.jpg", [(0, 0, 10, 10)]), temps, None, lake_mean))
    return out


def matcher_alone(store: FeatureStore, shards, prepared: list[PreparedQuery], searcher: Searcher,
                  batch_frames: int) -> float:
    """Seconds for the scan's per-batch work over all frames, the features already in memory:
    the dtype change where the scan makes one (:func:`dtm_ops.transfer.feed`), then the
    scan's own per-batch matcher (:meth:`dtm_ops.search.Searcher.batch_matcher`)."""
    from dtm_ops.transfer import feed

    device = searcher.device
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    feats = [(f.to(device), v.to(device)) for _, f, v in store.iter_shards(shards)]
    templates = [t.features.to(device, dtype) for p in prepared for t in p.templates]
    match = searcher.batch_matcher(templates, prepared[0].lake_mean)
    fed = searcher.feed_dtype(prepared[0].lake_mean)  # as the scan's batches reach the matcher

    def batches():
        for f, v in feats:
            for s in range(0, len(f), batch_frames):
                yield None, f[s : s + batch_frames], v[s : s + batch_frames]

    def run() -> None:
        for _, f, v in feed(batches(), device, fed):
            match(f, v)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # the method pick (and on CUDA the graphs' captures)
    return best_of(run, 2)


def fresh_copies(fn):
    """``fn()`` with the scan's CPU feeder converting each batch into a fresh float32 tensor,
    as it did before :func:`dtm_ops.transfer.feed` reused one buffer and before the matcher
    converted fp16 features itself, a chunk at a time."""
    import dtm_ops.search

    def fresh(batches, device, dtype):
        for meta, features, valid in batches:
            yield meta, features.to(torch.float32), valid

    kept, dtm_ops.search.feed = dtm_ops.search.feed, fresh
    try:
        return fn()
    finally:
        dtm_ops.search.feed = kept


def raw_ranged(store: FeatureStore, shards) -> None:
    """The reader's GETs and nothing else: each shard's ranged parts (:func:`part_bytes`) on
    ``store.workers`` threads, read in place into one new buffer per shard, shards started
    ahead within the reader's budget (``store.prefetch_bytes``) and waited for in order."""
    objects = store.objects
    with ThreadPoolExecutor(store.workers) as pool:
        def start(entry):
            buf = memoryview(torch.empty(entry.bytes, dtype=torch.uint8).numpy())
            step = part_bytes(entry.bytes, store.workers) if objects.ranged_reads else entry.bytes
            return entry.bytes, [pool.submit(objects.read_into, SHARDS + entry.name, buf[o : o + step], o)
                                 for o in range(0, entry.bytes, step)]

        ahead: deque = deque()
        in_flight = 0
        for entry in shards:
            while ahead and in_flight + entry.bytes > store.prefetch_bytes:
                size, parts = ahead.popleft()
                [f.result() for f in parts]
                in_flight -= size
            ahead.append(start(entry))
            in_flight += entry.bytes
        for _, parts in ahead:
            [f.result() for f in parts]


def pin_server(folder: str, cpus: set[int]) -> set[int]:
    """Pin every thread of the S3 server started in ``folder`` to ``cpus`` and this process to
    the other CPUs (its torch threads as many); returns those."""
    rest = os.sched_getaffinity(0) - cpus
    if not cpus or not rest:
        have = sorted(os.sched_getaffinity(0))
        raise SystemExit(f"--server-cpus {sorted(cpus)} must leave this process one of its CPUs {have}")
    for pidfile in Path(folder, "run").glob("*.pid"):
        subprocess.run(["taskset", "-a", "-p", "-c", ",".join(map(str, sorted(cpus))), pidfile.read_text().strip()],
                       check=True, capture_output=True)
    os.sched_setaffinity(0, rest)
    torch.set_num_threads(len(rest))
    return rest


def busy_during(fn) -> float:
    """Share of the machine's CPU time that was busy while ``fn`` ran (from /proc/stat)."""
    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)

    idle0, all0 = ticks()
    fn()
    idle1, all1 = ticks()
    return 1 - (idle1 - idle0) / max(1, all1 - all0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--s3", action="store_true", help="use the S3 server (DTM_S3_ENDPOINT or a Ceph one started here)")
    ap.add_argument("--frames", type=int, default=2048)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--channels", type=int, default=112)
    ap.add_argument("--grid", type=int, nargs=2, default=(30, 40))
    ap.add_argument("--cases", nargs="+", default=["1x1", "1x9", "16x9"],
                    help="QUERIESxSCALES (at most 9 scales); with m at the end, each query its own ROI shape "
                         "(query_sets.py), e.g. 64x9m")
    ap.add_argument("--batch-frames", type=int, nargs="+", default=[0],
                    help="frames matched per step; several: each side by side; 0: the Searcher's default for the "
                         "device (default)")
    ap.add_argument("--center", action="store_true", help="mean-centred matching (Searcher(center=True))")
    ap.add_argument("--cuda-graphs", action="store_true", help="Searcher(cuda_graphs=True): CUDA graphs per step")
    ap.add_argument("--server-cpus", type=int, nargs="+", default=[],
                    help="with --s3: pin the S3 server to these CPUs and this process to the others, as a server "
                         "on other machines would be (default: both share every CPU)")
    ap.add_argument("--retain-ab", action="store_true",
                    help="measure everything twice: freed memory returned to the kernel (DTM_RETAIN_FREED_MB=0), "
                         "then kept (dtm_ops.allocator), and compare")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", help="also write one JSON line per measurement here")
    a = ap.parse_args()
    folder = None
    if a.s3:
        from bench_store import drop_bucket, server_config

        cfg, folder = server_config()
        bucket = f"scan-{int(time.time())}"
        cfg.client().create_bucket(Bucket=bucket)
        uri, kw = f"s3://{bucket}/lake", {"s3_config": cfg}
        if a.server_cpus:
            if folder is None:
                raise SystemExit("--server-cpus needs the S3 server started here (no DTM_S3_ENDPOINT)")
            rest = pin_server(folder, set(a.server_cpus))
            print(f"S3 server pinned to CPU {', '.join(map(str, a.server_cpus))}; this process to CPU "
                  f"{', '.join(map(str, sorted(rest)))}")
    else:
        uri, kw = tempfile.mkdtemp(prefix="dtm-scan-"), {}
    try:
        store = FeatureStore.open(uri, **kw)
        fill(store, a.frames, a.channels, tuple(a.grid), a.per_shard)
        shards = store.manifest().shards
        total = sum(s.bytes for s in shards)
        objects = store.objects

        def raw_sequential() -> None:
            for s in shards:
                objects.get(SHARDS + s.name)

        def raw_parallel() -> None:
            with ThreadPoolExecutor(store.workers) as pool:
                list(pool.map(lambda s: len(objects.get(SHARDS + s.name)), shards))

        log = open(a.json, "a") if a.json else None
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Searcher.scan needs only the extractor's device and stride: the templates are made here.
        searchers = {bf: Searcher(SimpleNamespace(device=device, stride=16), top_k=20, batch_frames=bf or None,
                                  cuda_graphs=a.cuda_graphs) for bf in a.batch_frames}

        def measure(retain: str) -> dict:
            """Every measurement once, freed memory kept as ``DTM_RETAIN_FREED_MB=retain`` says
            where the scan asks for it (on the CPU; so that the reads compare alike, it is asked
            for here first). A CUDA scan reads into page-locked buffers and does not ask."""
            os.environ[allocator.ENV] = retain
            kept = allocator.retain_freed_memory() if device.type != "cuda" else 0
            fps = {}
            t_seq = best_of(raw_sequential, a.repeat)
            t_par = best_of(raw_parallel, a.repeat)
            t_ranged = best_of(lambda: raw_ranged(store, shards), a.repeat)
            t_raw = min(t_seq, t_par, t_ranged)
            busy = busy_during(raw_parallel)
            name = machine(device)
            memory = f"freed memory kept ({kept >> 20} MiB)" if kept else "freed memory returned (glibc's default)"
            print(f"\n{'S3 server' if a.s3 else 'local folder'}: {len(shards)} shards, {total / 1e6:.0f} MB, "
                  f"{a.frames} frames of {a.channels}x{a.grid[0]}x{a.grid[1]} fp16; matcher on {name}; {memory}")
            print(f"  raw read, sequential GETs      : {total / 1e6 / t_seq:8.0f} MB/s "
                  f"{a.frames / t_seq:9.0f} frames/s")
            print(f"  raw read, {store.workers} GETs in flight     : {total / 1e6 / t_par:8.0f} MB/s "
                  f"{a.frames / t_par:9.0f} frames/s  ({busy:.0%} of the machine's {os.cpu_count()} cores busy)")
            print(f"  raw read, the reader's GETs    : {total / 1e6 / t_ranged:8.0f} MB/s "
                  f"{a.frames / t_ranged:9.0f} frames/s")
            cuda = device.type == "cuda"
            t_reader = best_of(lambda: [None for _ in store.iter_shards(shards, pin_memory=cuda)], a.repeat)
            print(f"  reader (GET, CRC, decode{', pinned' if cuda else ''}) : {total / 1e6 / t_reader:8.0f} MB/s "
                  f"{a.frames / t_reader:9.0f} frames/s")
            fps["raw read (the fastest)"], fps["reader"] = a.frames / t_raw, a.frames / t_reader
            sample = next(store.iter_shards(shards[:1]))[1]
            for case, (bf, searcher) in ((c, s) for c in a.cases for s in searchers.items()):
                nq, ns, mixed = parse_case(case)
                prepared = queries(nq, ns, a.channels, a.center, mixed)
                searcher.scan(store, prepared, shards[:1])  # warm-up: the matcher's method pick
                t_scan = best_of(lambda: searcher.scan(store, prepared, shards), a.repeat)
                t_match = matcher_alone(store, shards, prepared, searcher, searcher.frames_per_step(sample))
                label = case_label(nq, ns, mixed)
                if len(searchers) > 1:
                    label += f", {searcher.frames_per_step(sample)}{'' if bf else ' (default)'} a step"
                w = 31 if len(searchers) == 1 else 58
                pick = sorted(matching.set_picks([t.features for p in prepared for t in p.templates]))
                whole = f"  (auto for the whole set: {', '.join(pick)})" if pick else ""
                print(f"  {'matcher alone, ' + label:<{w}}: {total / 1e6 / t_match:8.0f} MB/s "
                      f"{a.frames / t_match:9.0f} frames/s{whole}")
                fps["matcher alone, " + label], fps["scan, " + label] = a.frames / t_match, a.frames / t_scan
                print(f"  {'scan, ' + label:<{w}}: {total / 1e6 / t_scan:8.0f} MB/s {a.frames / t_scan:9.0f} frames/s  "
                      f"scan / raw read = {t_raw / t_scan:.2f}")
                if not cuda and case == a.cases[0] and bf == a.batch_frames[0]:  # before the reused buffer
                    t_fresh = best_of(lambda: fresh_copies(lambda: searcher.scan(store, prepared, shards)), a.repeat)
                    print(f"  {'same, a fresh float32 copy':<{w}}: {total / 1e6 / t_fresh:8.0f} MB/s "
                          f"{a.frames / t_fresh:9.0f} frames/s  scan / this = {t_fresh / t_scan:.2f}")
                if log:
                    log.write(json.dumps({"kind": "scan", "store": "s3" if a.s3 else "local", "device": name,
                                          "queries": nq, "scales": ns, "mixed_shapes": mixed, "center": a.center,
                                          "frames": a.frames,
                                          "frames_per_step": searcher.frames_per_step(sample),
                                          "bytes": total, "raw_seq_s": t_seq, "raw_par_s": t_par,
                                          "raw_ranged_s": t_ranged, "server_cpus": a.server_cpus,
                                          "retain_mb": kept >> 20, "reader_s": t_reader,
                                          "raw_busy": busy, "matcher_s": t_match, "scan_s": t_scan,
                                          "ratio": t_raw / t_scan, "set_pick": pick}) + "\n")
            return fps

        if a.retain_ab:
            if device.type == "cuda":
                raise SystemExit("--retain-ab compares CPU scans (a CUDA scan does not keep freed memory)")
            off = measure("0")
            on = measure(str(allocator.DEFAULT_MB))
            print(f"\nfreed memory kept ({allocator.DEFAULT_MB} MiB, after the run without), frames/s:")
            for key in off:
                print(f"  {key:<40}: {off[key]:9.0f} without, {on[key]:9.0f} with  ({on[key] / off[key]:.2f}x)")
        else:
            measure(os.environ.get(allocator.ENV, str(allocator.DEFAULT_MB)))
        if device.type == "cuda":  # the GPU scan (fp16, pinned copies) finds what the CPU scan (fp32) finds
            prepared = queries(1, 9, a.channels)
            gpu = searchers[a.batch_frames[0]].scan(store, prepared, shards[:2])["q0"].items()
            cpu = Searcher(SimpleNamespace(device=torch.device("cpu"), stride=16), top_k=20).scan(store, prepared, shards[:2])["q0"].items()
            worst = max(abs(x[0] - y[0]) for x, y in zip(gpu, cpu))
            same = sum(x[1] == y[1] for x, y in zip(gpu, cpu))
            print(f"  GPU scan against CPU scan, top 20 of query 0: {same}/20 same frames in order, max score diff {worst:.1e}")
            assert worst < 0.05 and same >= 18
    finally:
        if folder:  # the server started here, and the objects in its memory with it
            subprocess.run(["bash", str(REPO / "scripts/s3-server.sh"), "stop", folder], capture_output=True)
        elif a.s3:
            drop_bucket(cfg, bucket)
        else:
            shutil.rmtree(uri, ignore_errors=True)


if __name__ == "__main__":
    main()
