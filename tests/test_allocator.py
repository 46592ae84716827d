"""Freed memory kept for reuse (dtm_ops.allocator): the setting, its effect on page faults,
and that a CPU scan asks for it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dtm_ops import allocator

REPO = Path(__file__).resolve().parents[1]
glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


def test_setting_reads_mib_and_names_the_variable_when_wrong(monkeypatch):
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.setting() == 1024 << 20
    monkeypatch.setenv(allocator.ENV, " 64 ")
    assert allocator.setting() == 64 << 20
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator.setting() == 0 and allocator.retain_freed_memory() == 0
    for bad in ("1.5", "-1", "lots", "2048"):
        monkeypatch.setenv(allocator.ENV, bad)
        wanted = f"field '{allocator.ENV}': expected a whole number from 0 to 2047, got '{bad}'"
        with pytest.raises(ValueError, match=wanted):
            allocator.setting()


FAULTS = """
import json, resource, sys, torch
from dtm_ops import allocator, store
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def churn(size):  # a tensor made, written and freed 12 times: faults of the last 3, on average
    counts = []
    for _ in range(12):
        before = faults()
        t = torch.empty(size, dtype=torch.uint8); t.fill_(1); del t
        counts.append(faults() - before)
    return sum(counts[-3:]) / 3
def reads(uri, passes):  # a store streamed again and again: faults of each pass
    s = store.FeatureStore.open(uri)
    counts = []
    for _ in range(passes):
        before = faults()
        for _ in s.iter_shards(): pass
        counts.append(faults() - before)
    return counts
size = 68 << 20
out = {"pages": size // 4096, "before": churn(size)}
if len(sys.argv) > 2:
    out["reads_before"] = reads(sys.argv[2], 3)
out["kept"] = allocator.retain_freed_memory()
out["after"] = churn(size)
if len(sys.argv) > 2:
    out["reads_after"] = reads(sys.argv[2], 7)
print(json.dumps(out))
"""


@glibc
def test_kept_memory_spares_the_page_faults_of_the_next_large_tensor_and_shard(tmp_path):
    """In a fresh process: a 68 MB tensor made again and again faults in every page (glibc
    maps it fresh), and after retain_freed_memory, once the heap has grown (a few rounds),
    hardly any. Streaming a local store of 3 shards of 67 MB faults in all their pages on
    every pass; with freed memory kept, a tenth to a third as many on average over 7
    passes (0-3 shards' worth a pass: small allocations split freed buffers, and the heap
    then grows for the next), as their buffers are made on the calling thread,
    whose heap can hand them on (a worker thread's would be mapped fresh whatever the
    thresholds)."""
    from dtm_ops.fingerprint import Fingerprint
    from dtm_ops.store import FeatureStore
    from dtm_ops.store.format import FrameEntry

    store = FeatureStore.open(tmp_path / "features")
    fp = Fingerprint("test", "random", "x", 16, 64)
    n, grid = 128 * 3, (64, 64)  # 512 KiB a frame in float16: 128 frames (64 MiB and more) a shard
    feats = torch.nn.functional.normalize(torch.rand(n, 64, *grid), dim=1)
    entries = [FrameEntry(f"f{i}", f"/x/{i}.jpg", "s", i, 1024, 1024, grid, 1.0) for i in range(n)]
    for s in range(0, n, 128):
        store.append(fp, entries[s : s + 128], list(feats[s : s + 128]))
    assert len(store.manifest().shards) == 3 and min(s.bytes for s in store.manifest().shards) > 64 << 20
    env = {**os.environ, allocator.ENV: "1024", "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", FAULTS, "x", str(tmp_path / "features")], env=env,
                         capture_output=True, text=True, check=True)
    got = json.loads(run.stdout)
    pages = got["pages"]
    assert got["kept"] == 1024 << 20
    assert got["before"] > 0.9 * pages and got["after"] < 0.05 * pages, got
    shard_pages = sum(s.bytes for s in store.manifest().shards) // 4096
    kept = got["reads_after"]
    assert min(got["reads_before"]) > 0.95 * shard_pages, got
    assert sum(kept) / len(kept) < 0.5 * shard_pages, got


def test_a_cpu_scan_keeps_freed_memory(monkeypatch):
    """Searcher.scan on the CPU asks for it (once per scan); the result is the same."""
    import dtm_ops.search as search

    calls = []
    monkeypatch.setattr(search, "retain_freed_memory", lambda: calls.append(1) or 0)
    empty = SimpleNamespace(manifest=lambda: SimpleNamespace(shards=[]), iter_shards=lambda shards, **kw: iter(()))
    searcher = search.Searcher(SimpleNamespace(device=torch.device("cpu"), stride=16), top_k=5)
    assert searcher.scan(empty, []) == {} and calls == [1]
