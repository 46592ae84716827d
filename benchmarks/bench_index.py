"""Indexing throughput: ``index_frames`` against its stages alone, side by side in one run.

- loading alone: frames read, decoded and preprocessed (``FeatureExtractor.prepare_frame``)
  one after another, and on the loader's worker threads (:func:`dtm_ops.media.map_frames`);
  one after another also with frames decoded in full before the resize (the policy before
  ``reduced_decode``, :mod:`dtm_ops.preprocess`; the same where frames are not resized to
  half or less, as the demo lake's);
- network alone: the extractor on frames already prepared (``extract_frames``);
- indexing: :func:`dtm_ops.indexing.index_frames` into a local store, with loading one frame
  after another before each batch (``loader_workers=1``, the default with the network on
  the CPU) and ahead of the network on worker threads (the default with it on a GPU).

Where the network leaves the CPU cores free (a GPU), loading ahead of it should bring
indexing to the speed of its slower stage: the table prints indexing / slowest stage.
Frames: the demo lake's JPEGs (bikes.mp4 and, where installed, vtest.avi), ``--video``
frames decoded from a video file, or generated JPEGs or video (``--synthetic``,
``--synthetic-video``).

    python benchmarks/bench_index.py [--frames 128] [--video PATH | --synthetic W H | --synthetic-video W H]
                                     [--weights random]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import tempfile

import torch

from dtm_ops.demo import build_lake
from dtm_ops.features import FeatureExtractor
from dtm_ops.indexing import default_loader_workers, index_frames
from dtm_ops.media import list_frames, map_frames
from dtm_ops.store import FeatureStore
from timing import best_of, machine


def synthetic_jpegs(folder: str, n: int, width: int, height: int) -> str:
    """``n`` JPEGs (quality 90) of smooth shapes with some noise, about as costly to decode
    as camera frames of that size; written once per size."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    folder = os.path.join(folder, f"{width}x{height}")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        path = os.path.join(folder, f"{i:06d}.jpg")
        if os.path.exists(path):
            continue
        im = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(im)
        for _ in range(40):
            x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
            r = int(rng.integers(width // 40, width // 6))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        pixels = np.asarray(im.filter(ImageFilter.GaussianBlur(3)), dtype=np.int16)
        pixels = np.clip(pixels + rng.integers(-12, 13, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(path, quality=90)
    return folder


def synthetic_video(folder: str, n: int, width: int, height: int) -> str:
    """An H.264 video (libx264, CRF 20, 30 frames/s) of :func:`synthetic_jpegs`' frames."""
    import av
    import numpy as np
    from PIL import Image

    path = os.path.join(folder, f"{width}x{height}-{n}.mp4")
    if os.path.exists(path):
        return path
    frames = sorted(os.listdir(synthetic_jpegs(folder, n, width, height)))[:n]
    tmp = path + ".part"
    with av.open(tmp, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=30, options={"crf": "20", "preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for name in frames:
            rgb = np.asarray(Image.open(os.path.join(folder, f"{width}x{height}", name)).convert("RGB"))
            out.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        out.mux(stream.encode())
    os.replace(tmp, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=128)
    ap.add_argument("--video", help="index frames of this video instead of the demo lake's JPEGs")
    ap.add_argument("--synthetic", type=int, nargs=2, metavar=("W", "H"),
                    help="index generated JPEGs of W x H pixels (needs only Pillow: for machines without the demo "
                         "videos or PyAV)")
    ap.add_argument("--synthetic-video", type=int, nargs=2, metavar=("W", "H"),
                    help="index the frames of a generated H.264 video of W x H pixels (needs PyAV)")
    ap.add_argument("--weights", help="backbone weights (default: the packaged ones; 'random' where they are missing)")
    ap.add_argument("--repeat", type=int, default=2)
    a = ap.parse_args()
    if a.video:
        refs, what = list_frames(a.video)[: a.frames], os.path.basename(a.video)
    elif a.synthetic_video:
        video = synthetic_video(os.path.join(tempfile.gettempdir(), "dtm-bench-jpegs"), a.frames, *a.synthetic_video)
        refs = list_frames(video)
        what = (f"frames of a generated {a.synthetic_video[0]}x{a.synthetic_video[1]} H.264 video "
                f"({os.path.getsize(video) * 8 * 30 / len(refs) / 1e6:.0f} Mbit/s at 30 frames/s)")
    elif a.synthetic:
        folder = synthetic_jpegs(os.path.join(tempfile.gettempdir(), "dtm-bench-jpegs"), a.frames, *a.synthetic)
        refs, what = list_frames(folder)[: a.frames], f"generated {a.synthetic[0]}x{a.synthetic[1]} JPEGs"
    else:
        lake = build_lake(os.path.join(tempfile.gettempdir(), "dtm-bench-lake"))
        every = list_frames(lake)
        refs = every[:: max(1, len(every) // a.frames)][: a.frames]
        what = f"demo lake JPEGs ({lake})"
    n = len(refs)
    ex = FeatureExtractor(weights=a.weights)
    workers = max(2, default_loader_workers(ex.device))  # the CPU default (1) is the row above
    sync = torch.cuda.synchronize if ex.device.type == "cuda" else None
    where = machine(ex.device)
    print(f"\n{where}: indexing {n} frames, {what}; batches of {ex.batch_size}, best of {a.repeat}")

    full = copy.copy(ex)  # the same network, frames decoded in full
    full.preprocess = dataclasses.replace(ex.preprocess, reduced_decode=False)
    frames = [f for _, f in map_frames(refs, ex.prepare_frame, workers=workers)]
    rows = {
        "loading, one after another": lambda: list(map_frames(refs, ex.prepare_frame, workers=1)),
        "same, decoded in full": lambda: list(map_frames(refs, full.prepare_frame, workers=1)),
        f"loading, {workers} worker threads": lambda: list(map_frames(refs, ex.prepare_frame, workers=workers)),
        "network alone": lambda: [ex.extract_frames(frames[s : s + ex.batch_size], dtype=torch.float16)
                                  for s in range(0, n, ex.batch_size)],  # float16 out, as indexing asks
    }

    def index(loader_workers: int, extractor: FeatureExtractor = ex):
        def run():
            with tempfile.TemporaryDirectory() as d:
                index_frames(refs, FeatureStore.open(d), extractor, loader_workers=loader_workers)
        return run

    # every row warmed up once: kernel picks, the page cache, the allocator
    seconds = {name: best_of(fn, a.repeat, sync, warm_up=True) for name, fn in rows.items()}
    slowest = max(seconds[f"loading, {workers} worker threads"], seconds["network alone"])
    seconds["indexing, loading before each batch"] = best_of(index(1), a.repeat, sync, warm_up=True)
    seconds[f"indexing, loading ahead on {workers} threads"] = best_of(index(workers), a.repeat, sync, warm_up=True)
    # the default (the CPU: loading before each batch; a GPU: ahead), frames decoded in full
    default = "indexing, loading before each batch" if ex.device.type != "cuda" else \
        f"indexing, loading ahead on {workers} threads"
    before = "same as the default, decoded in full"
    seconds[before] = best_of(index(1 if ex.device.type != "cuda" else workers, full), a.repeat, sync, warm_up=True)
    for name, s in seconds.items():
        line = f"  {name:<42}: {n / s:8.1f} frames/s"
        if name.startswith("indexing"):
            line += f"  indexing / slowest stage = {slowest / s:.2f}"
        if name == before:
            line += f"  default / this = {s / seconds[default]:.2f}"
        if name == "same, decoded in full":
            line += f"  reduced decode / this = {s / seconds['loading, one after another']:.2f}"
        print(line)


if __name__ == "__main__":
    main()
