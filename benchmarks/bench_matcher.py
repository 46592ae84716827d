"""Matcher throughput: the engine against a naive per-frame loop and batched conv2d.

Every method computes the same frame scores (checked against an fp32/fp64 reference in the
same run); ratios are measured side by side in one run. Each timing is the best of
``--repeat`` after a warm-up (the engine's warm-up includes its one-time method pick).

CPU (always): the demo backbone's default layer (EfficientNet-Lite0 block_s16: 112
channels, stride 16) on a 640x480 frame, a 30x40 grid; fp32. The scan's work per batch:
similarity maps, then the best position per frame. Freed memory is kept in the process for
reuse, as a CPU scan keeps it (:mod:`dtm_ops.allocator`; ``DTM_RETAIN_FREED_MB=0``: not).

GPU (when CUDA is present): the grid of issue 7, a 1080p frame at stride 16 (68x120 cells),
C = 128/256/1024, templates 2x4, 7x12 and 17x30, Q = 1/16/64 queries, fp16, against batched
fp16 conv2d (cuDNN) with a max per frame. It also reports effective GB/s of features read
and its share of the HBM read bandwidth measured in the same run.

With ``--forms`` (CPU): only the spectral method's two forms of its channel sums, four real
products per frequency against three, side by side on 32 frames, for 9 to 288 templates.

With ``--chunks`` (CPU): only the spectral method's frames per pass on the CPU
(:func:`dtm_ops.spectral.cpu_chunk_frames`), 16 against 32, in calls of the scan's 32 frames,
for query sets of 9 to 576 templates (:mod:`query_sets`), with freed memory returned to the
kernel and then kept (as the scan keeps it, :mod:`dtm_ops.allocator`).

    .venv/bin/python benchmarks/bench_matcher.py [--frames 256] [--repeat 3] [--json OUT.jsonl]
    .venv/bin/python benchmarks/bench_matcher.py --forms
    .venv/bin/python benchmarks/bench_matcher.py --chunks
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
import torch.nn.functional as F

from dtm_ops import allocator, matching, spectral
from dtm_ops.cudagraphs import GraphCache, capture
from dtm_ops.matching import best_matches, position_mask
from query_sets import SCALES, case_label, parse_case, template_sizes
from timing import best_of, machine

timeit = functools.partial(best_of, warm_up=True)

CPU_GRID = (30, 40)
CPU_CHANNELS = 112
# (label, template sizes): one query of one scale; 16 queries; one query over 9 scales; 16
# queries over 9 scales, with one ROI shape and with each its own (query_sets.py).
CPU_CASES = [
    ("Q=1, 4x3 template", [(4, 3)]),
    ("Q=1, 8x6 template", [(8, 6)]),
    ("Q=16, 4x3 templates", [(4, 3)] * 16),
    ("Q=16, 8x6 templates", [(8, 6)] * 16),
    ("Q=1 x 9 scales (2x1..16x12)", sorted(SCALES)),
    ("Q=16 x 9 scales", sorted(SCALES) * 16),
    ("Q=16 x 9 scales, mixed shapes", [hw for q in template_sizes(16, 9, mixed=True) for hw in q]),
]
CPU_METHODS = ("fold", "slices", "conv", "fft")
GPU_GRID = (68, 120)


def engine(features: torch.Tensor, templates: list[torch.Tensor], method: str = "auto") -> torch.Tensor:
    """The scan's step (:func:`dtm_ops.matching.best_matches`): best score per frame ``[T, N]``."""
    return best_matches(features, templates, method=method)[0]


def batched_conv(features: torch.Tensor, templates: list[torch.Tensor]) -> torch.Tensor:
    """All frames at once, templates grouped by size (one conv2d per size), max per frame."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, t in enumerate(templates):
        by_size.setdefault(tuple(t.shape[1:]), []).append(i)
    out = torch.empty(len(templates), features.shape[0], device=features.device)
    for (h, w), idx in by_size.items():
        x = F.pad(features, (w // 2, w // 2, h // 2, h // 2))
        y = F.conv2d(x, torch.stack([templates[i] for i in idx]))
        out[idx] = (y.amax(dim=(2, 3)).float() / (h * w)).T
    return out


def naive(features: torch.Tensor, templates: list[torch.Tensor]) -> torch.Tensor:
    """One frame and one template at a time, in fp32."""
    out = torch.empty(len(templates), features.shape[0], device=features.device)
    for k, t in enumerate(templates):
        h, w = t.shape[1:]
        t32 = t.float()[None]
        for n, f in enumerate(features):
            x = F.pad(f.float()[None], (w // 2, w // 2, h // 2, h // 2))
            out[k, n] = F.conv2d(x, t32).max() / (h * w)
    return out


def reference(features: torch.Tensor, templates: list[torch.Tensor]) -> torch.Tensor:
    """Best score per frame ``[T, N]``, one frame and template at a time, under the engine's
    border rule (positions with less than half the template on the frame do not count)."""
    out = torch.empty(len(templates), features.shape[0], dtype=torch.float64)
    n, _, H, W = features.shape
    for k, t in enumerate(templates):
        h, w = t.shape[1:]
        ok = position_mask(torch.tensor([[H, W]]), (H, W), (h, w))[0]
        for i, f in enumerate(features):
            x = F.pad(f[None], (w // 2, w // 2, h // 2, h // 2))
            out[k, i] = F.conv2d(x, t[None])[0, 0][ok].max().double().cpu() / (h * w)
    return out


def check(features: torch.Tensor, templates: list[torch.Tensor], tol: float, method: str = "auto") -> float:
    """Largest difference of the engine's frame scores from :func:`reference`: in fp64 on
    the CPU, in strict fp32 (no TF32) on the GPU, from the same (fp16-rounded) inputs."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        dtype = torch.float64 if features.device.type == "cpu" else torch.float32
        want = reference(features.to(dtype), [t.to(dtype) for t in templates])
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    got = engine(features, templates, method)
    err = (got.double().cpu() - want).abs().max().item()
    assert err <= tol, f"engine differs from the reference by {err:.2e} (> {tol})"
    return err


#: Calls issued back to back before one sync, for the "streamed" columns: throughput as a
#: scan over batches sees it, where one call's Python and launch work overlaps the GPU work
#: of the calls before it (one call timed alone pays both, one after the other).
STREAM = 4


def streamed(fn, calls: int = STREAM):
    """``fn`` called ``calls`` times with no sync between (time it, divide by ``calls``)."""
    return lambda: [fn() for _ in range(calls)]


def unit(shape, g, device, dtype) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=g), dim=-3).to(device, dtype)


def bench_cpu(frames: int, repeat: int, log) -> None:
    g = torch.Generator().manual_seed(0)
    feats = unit((frames, CPU_CHANNELS, *CPU_GRID), g, "cpu", torch.float32)
    sync = lambda: None  # noqa: E731
    kept = allocator.retain_freed_memory()  # as a CPU scan's process does; DTM_RETAIN_FREED_MB=0: not
    memory = f"freed memory kept ({kept >> 20} MiB), as a CPU scan keeps it" if kept else "freed memory returned"
    print(f"\n{machine()}: float32, {frames} frames of {CPU_CHANNELS}x{CPU_GRID[0]}x{CPU_GRID[1]}; {memory}")
    log({"kind": "cpu_env", "retain_mb": kept >> 20})
    print(f"{'case':<30} {'engine f/s':>11} {'conv2d f/s':>11} {'naive f/s':>10} {'vs conv2d':>10} {'vs naive':>9}")
    for label, sizes in CPU_CASES:
        temps = [unit((CPU_CHANNELS, h, w), g, "cpu", torch.float32) for h, w in sizes]
        t_engine = timeit(lambda: engine(feats, temps), repeat, sync)
        t_conv = timeit(lambda: batched_conv(feats, temps), repeat, sync)
        n_naive = max(8, frames // 8)
        t_naive = timeit(lambda: naive(feats[:n_naive], temps), 1, sync) * frames / n_naive
        fe, fc, fn = frames / t_engine, frames / t_conv, frames / t_naive
        err = check(feats[:4], temps, 1e-4)
        print(f"{label:<30} {fe:>11.0f} {fc:>11.0f} {fn:>10.0f} {fe / fc:>9.2f}x {fe / fn:>8.1f}x")
        log({"kind": "cpu", "case": label, "engine_fps": fe, "conv_fps": fc, "naive_fps": fn, "max_err": err})
    print("\neach method alone (frames/s; the engine times them and keeps the fastest per template size)")
    print(f"{'case':<30} " + " ".join(f"{m:>10}" for m in CPU_METHODS))
    for label, sizes in CPU_CASES:
        temps = [unit((CPU_CHANNELS, h, w), g, "cpu", torch.float32) for h, w in sizes]
        fps = {m: frames / timeit(lambda: engine(feats, temps, m), repeat, sync) for m in CPU_METHODS}
        print(f"{label:<30} " + " ".join(f"{fps[m]:>10.0f}" for m in CPU_METHODS))
        log({"kind": "cpu_methods", "case": label, **{f"{m}_fps": v for m, v in fps.items()}})


def spectral_forms(frames: int, repeat: int, log) -> None:
    """The spectral method's channel sums in four real products per frequency against three
    (Gauss; :func:`dtm_ops.spectral.channel_sums`), side by side, the two timed in turn
    ``repeat`` times each, for growing numbers of templates: where the three pay for their
    extra pass over the frame spectra (:data:`dtm_ops.spectral.THREE_PRODUCTS_MIN`)."""
    g = torch.Generator().manual_seed(2)
    feats = unit((frames, CPU_CHANNELS, *CPU_GRID), g, "cpu", torch.float32)
    valid = torch.tensor([CPU_GRID] * frames)
    scales = CPU_CASES[4][1]
    forms = {"four": 1 << 30, "three": 1}
    kept = spectral.THREE_PRODUCTS_MIN
    print(f"\n{machine()}: spectral method, float32, {frames} frames of {CPU_CHANNELS}x{CPU_GRID[0]}x{CPU_GRID[1]}; "
          f"ms per call, best of {repeat} (the forms timed in turn); THREE_PRODUCTS_MIN = {kept}")
    print(f"{'templates':<26} {'four':>8} {'three':>8} {'three/four':>11}")
    cases = [("1 x 9 scales", scales), ("16 of 8x6", [(8, 6)] * 16), ("4 x 9 scales", scales * 4),
             ("64 of 8x6", [(8, 6)] * 64), ("16 x 9 scales", scales * 16), ("32 x 9 scales", scales * 32)]
    try:
        for label, sizes in cases:
            temps = [unit((CPU_CHANNELS, h, w), g, "cpu", torch.float32) for h, w in sizes]
            call = functools.partial(spectral.best_matches, feats, temps, valid, matching.MAX_PRODUCT_BYTES)
            took = {name: [] for name in forms}
            for name, least in forms.items():  # warm-up: plans and both forms of the spectra
                spectral.THREE_PRODUCTS_MIN = least
                torch.testing.assert_close(call()[0], engine(feats, temps, "slices"), atol=1e-4, rtol=0)
            for _ in range(repeat):
                for name, least in forms.items():
                    spectral.THREE_PRODUCTS_MIN = least
                    took[name].append(best_of(call, 1))
            four, three = min(took["four"]) * 1e3, min(took["three"]) * 1e3
            print(f"{f'{len(temps)} ({label})':<26} {four:>8.1f} {three:>8.1f} {three / four:>10.2f}x")
            log({"kind": "spectral_forms", "templates": len(temps), "four_ms": four, "three_ms": three})
    finally:
        spectral.THREE_PRODUCTS_MIN = kept


def spectral_chunks(frames: int, repeat: int, log, cases=("1x9", "4x9m", "16x9", "16x9m", "64x9m")) -> None:
    """The spectral method's frames per pass on the CPU, 16 against 32, side by side: calls
    of 32 frames (the scan's CPU step, :data:`dtm_ops.search.CPU_BATCH_FRAMES`) over
    ``frames`` frames, the two timed in turn ``repeat`` times each. Larger passes reuse each
    template spectrum for more frames, but their intermediates are larger: without freed
    memory kept, fresh pages to fault in on every call. So the comparison runs twice, freed
    memory returned to the kernel (glibc's default; first, since keeping it cannot be undone
    in a process) and kept (:func:`dtm_ops.allocator.retain_freed_memory`, as the scan does)."""
    from dtm_ops.search import CPU_BATCH_FRAMES

    g = torch.Generator().manual_seed(3)
    feats = unit((frames, CPU_CHANNELS, *CPU_GRID), g, "cpu", torch.float32)
    valid = torch.tensor([CPU_GRID] * frames)
    step, chunks = CPU_BATCH_FRAMES, (16, 32)
    saved = spectral.CPU_CHUNK_FRAMES, spectral.CPU_CHUNK_FRAMES_KEPT
    sets = {case: [unit((CPU_CHANNELS, h, w), g, "cpu", torch.float32)
                   for q in template_sizes(*parse_case(case)) for h, w in q] for case in cases}

    def scan(temps):
        for s in range(0, frames, step):
            spectral.best_matches(feats[s : s + step], temps, valid[s : s + step], matching.MAX_PRODUCT_BYTES)

    os.environ[allocator.ENV] = "0"
    try:
        for memory in ("returned", "kept"):
            if memory == "kept":
                os.environ[allocator.ENV] = str(allocator.DEFAULT_MB)
                allocator.retain_freed_memory()
            print(f"\n{machine()}: spectral method, float32, {frames} frames of {CPU_CHANNELS}x{CPU_GRID[0]}x"
                  f"{CPU_GRID[1]} in calls of {step}; frames/s, best of {repeat} (timed in turn); freed memory "
                  f"{memory}")
            print(f"{'query set':<44} " + " ".join(f"{f'{c} a pass':>10}" for c in chunks) + f" {'32 / 16':>8}")
            for case, temps in sets.items():
                took = {c: [] for c in chunks}
                for c in chunks:  # warm-up: the plan, the spectra, each size of intermediates
                    spectral.CPU_CHUNK_FRAMES = spectral.CPU_CHUNK_FRAMES_KEPT = c
                    scan(temps)
                for _ in range(repeat):
                    for c in chunks:
                        spectral.CPU_CHUNK_FRAMES = spectral.CPU_CHUNK_FRAMES_KEPT = c
                        took[c].append(best_of(lambda: scan(temps), 1))
                fps = {c: frames / min(took[c]) for c in chunks}
                label = f"{case_label(*parse_case(case))} ({len(temps)})"
                print(f"{label:<44} " + " ".join(f"{fps[c]:>10.0f}" for c in chunks)
                      + f" {fps[32] / fps[16]:>7.2f}x")
                log({"kind": "spectral_chunks", "case": case, "templates": len(temps), "freed_memory": memory,
                     **{f"chunk{c}_fps": fps[c] for c in chunks}})
    finally:
        spectral.CPU_CHUNK_FRAMES, spectral.CPU_CHUNK_FRAMES_KEPT = saved


def picked(temps: list[torch.Tensor], h: int, w: int, n: int) -> str:
    """The engine's pick for these ``h x w`` templates over ``n`` frames: the spectral
    method where it was weighed for the whole set and won, else the size group's method."""
    if "fft" in matching.set_picks(temps):
        return "fft"
    return ", ".join(sorted(matching.group_picks(temps, n)[(h, w)]))


def hbm_read_gbps(device) -> float:
    x = torch.empty(4 << 30, dtype=torch.uint8, device=device).view(torch.float16)
    x.fill_(1)
    t = timeit(lambda: x.sum(dtype=torch.float32), 5, torch.cuda.synchronize)
    return (4 << 30) / t / 1e9


def bench_gpu(repeat: int, log, channels=(128, 256, 1024)) -> None:
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    hbm = hbm_read_gbps(dev)
    print(f"\n{machine('cuda')}, fp16, {GPU_GRID[0]}x{GPU_GRID[1]} grid; HBM read {hbm:.0f} GB/s (measured)")
    log({"kind": "env", "device": machine("cuda"), "torch": torch.__version__, "hbm_read_GBps": hbm})
    print(f"one call timed alone; (streamed) {STREAM} calls back to back before one sync; (graphs) the same "
          "through the scan's CUDA-graph cache (dtm_ops.cudagraphs)")
    print(f"{'C':>5} {'tmpl':>6} {'Q':>3} {'N':>4} {'engine f/s':>11} {'GB/s':>6} {'%HBM':>5} {'conv2d f/s':>11} "
          f"{'vs conv2d':>9} {'max err':>8} {'picked':>6} {'shift f/s':>10} {'streamed':>9} {'GB/s':>6} {'%HBM':>5} "
          f"{'conv2d':>9} {'vs conv2d':>9} {'graphs':>9} {'%HBM':>5} {'vs conv2d':>9} {'fft f/s':>9}")
    g = torch.Generator().manual_seed(0)
    for C in channels:
        frames = max(32, min(512, int(1e9 / (C * GPU_GRID[0] * GPU_GRID[1] * 2))))
        feats = unit((frames, C, *GPU_GRID), g, dev, torch.float16)
        per_frame = C * GPU_GRID[0] * GPU_GRID[1] * 2
        for h, w in ((2, 4), (7, 12), (17, 30)):
            for Q in (1, 16, 64):
                temps = [unit((C, h, w), g, dev, torch.float16) for _ in range(Q)]
                t_e = timeit(lambda: engine(feats, temps), repeat, sync)
                t_c = timeit(lambda: batched_conv(feats, temps), repeat, sync)
                t_s = timeit(lambda: engine(feats, temps, "shift"), repeat, sync)
                # the spectral method alone, timed wherever the engine weighs it
                spectral_tried = spectral.weighed(torch.float16, GPU_GRID, C, [(h, w)] * Q, "cuda")
                t_f = timeit(lambda: engine(feats, temps, "fft"), repeat, sync) if spectral_tried else None
                t_es = timeit(streamed(lambda: engine(feats, temps)), repeat, sync) / STREAM
                t_cs = timeit(streamed(lambda: batched_conv(feats, temps)), repeat, sync) / STREAM
                cached = GraphCache(lambda f: best_matches(f, temps))
                cached(feats), cached(feats)  # seen once, then captured
                t_gs = timeit(streamed(lambda: cached(feats)), repeat, sync) / STREAM
                graph_same = bool(torch.equal(cached(feats)[0], engine(feats, temps)))
                graph_failed, cached = cached.failed, None  # the graph's memory back
                err = max(check(feats[:2], temps, 2e-2), check(feats[:2], temps, 2e-2, "shift"),
                          check(feats[:2], temps, 2e-2, "fft") if spectral_tried else 0.0)
                fe, fc, fs, fes, fcs, fgs = (frames / t for t in (t_e, t_c, t_s, t_es, t_cs, t_gs))
                gbps, gbps_s, gbps_g = (f * per_frame / 1e9 for f in (fe, fes, fgs))
                pick = picked(temps, h, w, len(feats))
                ff = frames / t_f if t_f else None
                print(f"{C:>5} {h:>2}x{w:<3} {Q:>3} {frames:>4} {fe:>11.0f} {gbps:>6.0f} {100 * gbps / hbm:>4.0f}% "
                      f"{fc:>11.0f} {fe / fc:>8.2f}x {err:>8.1e} {pick:>6} {fs:>10.0f} {fes:>9.0f} {gbps_s:>6.0f} "
                      f"{100 * gbps_s / hbm:>4.0f}% {fcs:>9.0f} {fes / fcs:>8.2f}x {fgs:>9.0f} "
                      f"{100 * gbps_g / hbm:>4.0f}% {fgs / fcs:>8.2f}x {ff or float('nan'):>9.0f}"
                      + ("" if graph_same else "  GRAPH RESULT DIFFERS")
                      + (f"  NO GRAPH: {graph_failed}" if graph_failed else ""), flush=True)
                log({"kind": "gpu", "C": C, "h": h, "w": w, "Q": Q, "N": frames, "engine_fps": fe, "conv_fps": fc,
                     "shift_fps": fs, "picked": pick, "feat_GBps": gbps, "hbm_share": gbps / hbm, "max_err": err,
                     "engine_streamed_fps": fes, "conv_streamed_fps": fcs, "streamed_hbm_share": gbps_s / hbm,
                     "graphs_streamed_fps": fgs, "graphs_hbm_share": gbps_g / hbm, "graph_same": graph_same,
                     "graph_failed": graph_failed, "fft_fps": ff})
        del feats
        torch.cuda.empty_cache()
    C, (h, w) = 256, (7, 12)
    feats = unit((32, C, *GPU_GRID), g, dev, torch.float16)
    temps = [unit((C, h, w), g, dev, torch.float16)]
    fn = 32 / timeit(lambda: naive(feats, temps), 1, sync)
    fe = 32 / timeit(lambda: engine(feats, temps), repeat, sync)
    print(f"per-frame fp32 loop, C={C}, {h}x{w}, Q=1: {fn:.0f} frames/s; engine on the same 32 frames {fe:.0f} ({fe / fn:.1f}x)")
    log({"kind": "gpu_naive", "C": C, "h": h, "w": w, "Q": 1, "naive_fps": fn, "engine_fps": fe})
    feats = unit((239, C, *GPU_GRID), g, dev, torch.float16)
    from dtm_ops import shiftmax

    t_gemm = timeit(lambda: shiftmax.products(feats, torch.stack(temps)), repeat, sync)  # the method's own GEMM
    alone = {m: 239 / timeit(lambda: engine(feats, temps, m), repeat, sync) for m in ("shift", "fold", "conv")}
    print(f"C={C}, {h}x{w}, Q=1, 239 frames: the GEMM alone {239 / t_gemm:.0f} frames/s; "
          + ", ".join(f"{m} {v:.0f}" for m, v in alone.items()))
    log({"kind": "gpu_parts", "C": C, "h": h, "w": w, "gemm_fps": 239 / t_gemm, **{f"{m}_fps": v for m, v in alone.items()}})


def tune_gpu(repeat: int, log) -> None:
    """Launch settings of the scan kernel (:data:`dtm_ops.shiftmax.TUNING`), side by side."""
    from dtm_ops import shiftmax

    dev, sync = torch.device("cuda"), torch.cuda.synchronize
    g = torch.Generator().manual_seed(0)
    C, frames = 256, 239
    feats = unit((frames, C, *GPU_GRID), g, dev, torch.float16)
    variants = [dict(elements=e, num_warps=nw, unroll=u) for e in (512, 1024, 2048, 4096) for nw in (4, 8)
                for u in (False, True)]
    print(f"\nscan kernel settings, C={C}, {frames} frames, frames/s of GEMM + kernel (method 'shift')")
    default = dict(shiftmax.TUNING)
    for h, w in ((2, 4), (7, 12), (17, 30)):
        for Q in (1, 16):
            temps = [unit((C, h, w), g, dev, torch.float16) for _ in range(Q)]
            row = []
            for v in variants:
                shiftmax.TUNING.update(v)
                row.append(frames / timeit(lambda: engine(feats, temps, "shift"), repeat, sync))
                log({"kind": "tune", "C": C, "h": h, "w": w, "Q": Q, **v, "fps": row[-1]})
            best = max(range(len(row)), key=row.__getitem__)
            print(f"  {h}x{w} Q={Q}: best {row[best]:.0f} with {variants[best]}; "
                  + " ".join(f"{r / 1000:.0f}k" for r in row), flush=True)
    shiftmax.TUNING.update(default)


#: ``--parts``: cases (C, template, Q) taken apart, and the kernel's launch settings tried on them.
PART_CASES = [(256, (2, 4), 1), (256, (7, 12), 1), (256, (7, 12), 16), (256, (17, 30), 1), (1024, (2, 4), 1)]
PART_VARIANTS = [{}, {"num_warps": 8}, {"elements": 2048}]
#: ``--parts``: bounds on the products of one GEMM tried for the whole method (``max_bytes``):
#: the default, and chunks small enough to stay in an H100/H200's 50-60 MB L2 cache between
#: the GEMM that writes them and the kernel that reads them.
PART_CHUNKS = (matching.MAX_PRODUCT_BYTES, 64 << 20, 24 << 20)


def call_costs(feats: torch.Tensor, group: torch.Tensor, repeat: int, sync, calls: int = 8) -> list[dict]:
    """The whole ``shift`` method at each bound of :data:`PART_CHUNKS`: frames/s of one call
    timed alone, of ``calls`` calls streamed, and on CUDA of replays of a CUDA graph of the
    call (alone and streamed: the GPU's work without the call's Python and launch work),
    with whether the graph's results equal the call's."""
    n, temps, out = len(feats), list(group), []
    for max_bytes in PART_CHUNKS:
        def call():
            return best_matches(feats, temps, method="shift", max_bytes=max_bytes)

        row = {"max_bytes": max_bytes, "alone": n / timeit(call, repeat, sync),
               "streamed": n * calls / timeit(streamed(call, calls), repeat, sync)}
        if feats.is_cuda:
            try:  # reported, not fatal: the rest of the one GPU run still counts
                want = call()
                graph, got = capture(call)
                graph.replay()
                sync()
                row["graph_same"] = all(torch.equal(a, b) for a, b in zip(got, want))
                row["graph"] = n / timeit(graph.replay, repeat, sync)
                row["graph_streamed"] = n * calls / timeit(streamed(graph.replay, calls), repeat, sync)
                del graph, got, want
            except Exception as e:  # noqa: BLE001
                row["graph_error"] = f"{type(e).__name__}: {e}"[:200]
            torch.cuda.empty_cache()
        out.append(row)
    return out


def parts(dev: torch.device, repeat: int, log, grid=GPU_GRID, cases=PART_CASES, gb: float = 1.0,
          variants=PART_VARIANTS) -> None:
    """Where the ``shift`` method's time goes, per case: the GEMM alone, the kernel alone on
    the GEMM's products (each launch setting of :data:`PART_VARIANTS`, checked equal to the
    default's result), the whole method, and the GPU time of each kernel it launches
    (``torch.profiler``). GB/s: the bytes each step must move (features in, products out for
    the GEMM; products in for the kernel)."""
    from torch.profiler import ProfilerActivity, profile

    from dtm_ops import shiftmax

    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    g = torch.Generator().manual_seed(0)
    print(f"\nthe shift method taken apart, {grid[0]}x{grid[1]} grid, fp16")
    for C, (h, w), Q in cases:
        n = max(8, min(512, int(gb * 1e9 / (C * grid[0] * grid[1] * 2))))
        feats = unit((n, C, *grid), g, dev, torch.float16)
        group = torch.stack([unit((C, h, w), g, dev, torch.float16) for _ in range(Q)])
        valid = torch.tensor([list(grid)], dtype=torch.int32).expand(n, 2).contiguous().to(dev)
        feat_b, prod_b = feats.numel() * 2, n * Q * h * w * grid[0] * grid[1] * 2
        t_gemm = timeit(lambda: shiftmax.products(feats, group), repeat, sync)
        prod = shiftmax.products(feats, group)
        want = shiftmax.reduce(prod, valid, grid, (h, w))
        row = []
        for v in variants:
            got = shiftmax.reduce(prod, valid, grid, (h, w), **v)
            same = bool(torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]))
            t = timeit(lambda: shiftmax.reduce(prod, valid, grid, (h, w), **v), repeat, sync)
            row.append((v, n / t, prod_b / t / 1e9, same))
            log({"kind": "parts_kernel", "C": C, "h": h, "w": w, "Q": Q, "N": n, **v, "fps": n / t,
                 "prod_GBps": prod_b / t / 1e9, "same": same})
        prod = None  # its memory back before the whole method runs
        t_all = timeit(lambda: engine(feats, list(group), "shift"), repeat, sync)
        costs = call_costs(feats, group, repeat, sync)
        acts = [ProfilerActivity.CUDA] if dev.type == "cuda" else [ProfilerActivity.CPU]  # kernels only
        with profile(activities=acts) as prof:
            for _ in range(repeat):
                engine(feats, list(group), "shift")
            if sync:
                sync()
        kernels = [(e.key, e.self_device_time_total / repeat) for e in prof.key_averages()
                   if getattr(e, "self_device_time_total", 0) > 0]
        kernels.sort(key=lambda k: -k[1])
        busy = sum(t for _, t in kernels)
        print(f"C={C} {h}x{w} Q={Q}, {n} frames: GEMM alone {n / t_gemm:.0f} frames/s "
              f"({(feat_b + prod_b) / t_gemm / 1e9:.0f} GB/s in+out); whole method {n / t_all:.0f} frames/s, "
              f"{t_all * 1e6:.0f} us a call, {busy:.0f} us of it on GPU kernels")
        for v, fps, gbps, same in row:
            print(f"    kernel alone {v or 'default'}: {fps:.0f} frames/s, products read at {gbps:.0f} GB/s"
                  + ("" if same else "  RESULT DIFFERS"))
        for name, us in kernels[:6]:
            print(f"    {us:9.1f} us  {name[:90]}")
        for r in costs:
            graph = (f"; CUDA graph alone {r['graph']:.0f}, streamed {r['graph_streamed']:.0f}"
                     + ("" if r["graph_same"] else "  GRAPH RESULT DIFFERS")) if "graph" in r else ""
            graph += f"; CUDA graph failed: {r['graph_error']}" if "graph_error" in r else ""
            print(f"    products at most {r['max_bytes'] >> 20} MiB a GEMM: one call alone {r['alone']:.0f} frames/s, "
                  f"streamed {r['streamed']:.0f}{graph}")
            log({"kind": "parts_calls", "C": C, "h": h, "w": w, "Q": Q, "N": n, **r})
        log({"kind": "parts", "C": C, "h": h, "w": w, "Q": Q, "N": n, "gemm_fps": n / t_gemm, "method_fps": n / t_all,
             "call_us": t_all * 1e6, "kernel_us": busy, "kernels": kernels[:8]})
        feats = None
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=256, help="CPU frames per call")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", help="also write one JSON line per measurement here")
    ap.add_argument("--skip-cpu", action="store_true")
    ap.add_argument("--forms", action="store_true",
                    help="CPU only: the spectral method's channel sums in four products against three")
    ap.add_argument("--chunks", action="store_true", help="CPU only: the spectral method's frames per pass, 16 "
                    "against 32")
    ap.add_argument("--tune", action="store_true", help="GPU only: time the scan kernel's launch settings")
    ap.add_argument("--parts", action="store_true", help="GPU only: where the scan kernel's time goes")
    ap.add_argument("--variants", type=int, default=len(PART_VARIANTS), help="--parts: the first N launch settings")
    ap.add_argument("--channels", type=int, nargs="+", default=[128, 256, 1024], help="GPU: channel counts of the grid")
    a = ap.parse_args()
    out = open(a.json, "a") if a.json else None

    def log(record: dict) -> None:
        if out:
            out.write(json.dumps(record) + "\n")
            out.flush()

    log({"kind": "env", "device": machine(), "torch": torch.__version__})
    if a.forms:
        spectral_forms(min(a.frames, 32), max(a.repeat, 7), log)
        return
    if a.chunks:
        spectral_chunks(a.frames, max(a.repeat, 4), log)
        return
    if not a.skip_cpu:
        bench_cpu(a.frames, a.repeat, log)
    if torch.cuda.is_available():
        if a.parts:
            parts(torch.device("cuda"), a.repeat, log, variants=PART_VARIANTS[: a.variants])
        elif a.tune:
            tune_gpu(a.repeat, log)
        else:
            bench_gpu(a.repeat, log, a.channels)


if __name__ == "__main__":
    main()
