"""Matcher throughput: the engine against a naive per-frame loop and batched conv2d.

All three compute the same similarity maps (checked); ratios are measured side by side in
one run. Feature size is the demo backbone's default layer (EfficientNet-Lite0 block_s16:
112 channels, stride 16) on a 640x480 frame: a 30x40 grid. Runs on the CPU, and on CUDA in
fp16 too when present.

    .venv/bin/python benchmarks/bench_matcher.py [--frames 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from dtm_ops.matching import patchwise_cosine

GRID = (30, 40)
CHANNELS = 112
# (label, template sizes): one query of one scale; 16 queries; one query over 9 scales.
CASES = [
    ("Q=1, 4x3 template", [(4, 3)]),
    ("Q=1, 8x6 template", [(8, 6)]),
    ("Q=16, 4x3 templates", [(4, 3)] * 16),
    ("Q=1 x 9 scales (2x1..16x12)", [(2, 1), (3, 2), (4, 3), (6, 4), (8, 6), (11, 8), (12, 9), (14, 10), (16, 12)]),
]


def naive(features: torch.Tensor, templates: list[torch.Tensor]) -> list[torch.Tensor]:
    """One frame and one template at a time (conv2d with the border padding)."""
    out = []
    for t in templates:
        h, w = t.shape[1:]
        maps = []
        for f in features:
            x = F.pad(f[None], (w // 2, w // 2, h // 2, h // 2))
            maps.append(F.conv2d(x, t[None]).float()[0, 0] / (h * w))
        out.append(torch.stack(maps))
    return out


def batched_conv(features: torch.Tensor, templates: list[torch.Tensor]) -> list[torch.Tensor]:
    """All frames at once, templates grouped by size (one conv2d per size)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(templates):
        by_size.setdefault(tuple(t.shape[1:]), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(templates)
    for (h, w), idx in by_size.items():
        x = F.pad(features, (w // 2, w // 2, h // 2, h // 2))
        y = F.conv2d(x, torch.stack([templates[i] for i in idx])).float() / (h * w)
        for k, i in enumerate(idx):
            out[i] = y[:, k]
    return out  # type: ignore[return-value]


def timeit(fn, repeat: int, sync) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def bench(device: torch.device, dtype: torch.dtype, frames: int, repeat: int) -> None:
    g = torch.Generator().manual_seed(0)
    feats = F.normalize(torch.randn(frames, CHANNELS, *GRID, generator=g), dim=1).to(device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"\n{device.type} {str(dtype).replace('torch.', '')}, {frames} frames of {CHANNELS}x{GRID[0]}x{GRID[1]}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'case':<30} {'engine f/s':>11} {'conv2d f/s':>11} {'naive f/s':>10} {'vs conv2d':>10} {'vs naive':>9}")
    for label, sizes in CASES:
        temps = [F.normalize(torch.randn(CHANNELS, h, w, generator=g), dim=0).to(device, dtype) for h, w in sizes]
        ref = naive(feats[:4], temps)
        got = patchwise_cosine(feats[:4], temps)
        for a, b in zip(got, ref):  # same maps (no valid mask: every position allowed here)
            fin = torch.isfinite(a)
            torch.testing.assert_close(a[fin], b[fin], atol=2e-2 if dtype == torch.float16 else 1e-4, rtol=0)
        t_engine = timeit(lambda: patchwise_cosine(feats, temps), repeat, sync)
        t_conv = timeit(lambda: batched_conv(feats, temps), repeat, sync)
        n_naive = max(8, frames // 8)
        t_naive = timeit(lambda: naive(feats[:n_naive], temps), 1, sync) * frames / n_naive
        fe, fc, fn = frames / t_engine, frames / t_conv, frames / t_naive
        print(f"{label:<30} {fe:>11.0f} {fc:>11.0f} {fn:>10.0f} {fe / fc:>9.2f}x {fe / fn:>8.1f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    bench(torch.device("cpu"), torch.float32, a.frames, a.repeat)
    if torch.cuda.is_available():
        bench(torch.device("cuda"), torch.float16, a.frames * 16, a.repeat)


if __name__ == "__main__":
    main()
