"""Indexing throughput: ``index_frames`` against its stages alone, side by side in one run.

- loading alone: frames read, decoded and preprocessed (``FeatureExtractor.prepare_frame``)
  one after another, and on the loader's worker threads (:func:`dtm_ops.media.map_frames`);
- network alone: the extractor on frames already prepared (``extract_frames``);
- indexing: :func:`dtm_ops.indexing.index_frames` into a local store, with loading one frame
  after another before each batch (``loader_workers=1``, the default with the network on
  the CPU) and ahead of the network on worker threads (the default with it on a GPU).

Where the network leaves the CPU cores free (a GPU), loading ahead of it should bring
indexing to the speed of its slower stage: the table prints indexing / slowest stage.
Frames: the demo lake's JPEGs (bikes.mp4 and, where installed, vtest.avi), or ``--video``
frames decoded from a video file.

    python benchmarks/bench_index.py [--frames 128] [--video PATH] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from dtm_ops.demo import build_lake
from dtm_ops.features import FeatureExtractor
from dtm_ops.indexing import index_frames
from dtm_ops.media import list_frames, load_frames, map_frames
from dtm_ops.store import FeatureStore
from timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--video", help="index frames of this video instead of the demo lake's JPEGs")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    if a.video:
        refs, what = list_frames(a.video)[: a.frames], os.path.basename(a.video)
    else:
        lake = build_lake(os.path.join(tempfile.gettempdir(), "dtm-bench-lake"))
        refs = list_frames(lake)[:: max(1, len(list_frames(lake)) // a.frames)][: a.frames]
        what = f"demo lake JPEGs ({lake})"
    n = len(refs)
    ex = FeatureExtractor()
    workers = min(8, os.cpu_count() or 1)
    sync = torch.cuda.synchronize if ex.device.type == "cuda" else None
    where = torch.cuda.get_device_name() if ex.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"\n{where}: indexing {n} frames, {what}; batches of {ex.batch_size}, best of {a.repeat}")

    frames = [f for _, f in map_frames(refs, ex.prepare_frame, workers=workers)]
    rows = {
        "loading, one after another": lambda: [ex.prepare_frame(im) for _, im in load_frames(refs)],
        f"loading, {workers} worker threads": lambda: list(map_frames(refs, ex.prepare_frame, workers=workers)),
        "network alone": lambda: [ex.extract_frames(frames[s : s + ex.batch_size])
                                  for s in range(0, n, ex.batch_size)],
    }

    def index(loader_workers: int):
        def run():
            with tempfile.TemporaryDirectory() as d:
                index_frames(refs, FeatureStore.open(d), ex, loader_workers=loader_workers)
        return run

    seconds = {name: best_of(fn, a.repeat, sync, warm_up=name == "network alone") for name, fn in rows.items()}
    slowest = max(seconds[f"loading, {workers} worker threads"], seconds["network alone"])
    seconds["indexing, loading before each batch"] = best_of(index(1), a.repeat, sync)
    seconds[f"indexing, loading ahead on {workers} threads"] = best_of(index(workers), a.repeat, sync)
    for name, s in seconds.items():
        line = f"  {name:<38}: {n / s:8.1f} frames/s"
        if name.startswith("indexing"):
            line += f"  indexing / slowest stage = {slowest / s:.2f}"
        print(line)


if __name__ == "__main__":
    main()
