"""Host-to-device feeding for the scan: copies run one batch ahead of the matcher.

On CUDA, each batch is copied from page-locked memory on a side stream while the matcher
works on the previous batch on the current stream; an event orders each batch's use after
its copy. With the store's prefetching reader (GETs, checksum and decode on worker
threads, :meth:`dtm_ops.store.FeatureStore.iter_shards`) every stage of the scan overlaps,
so it runs at the speed of its slowest stage. On the CPU the "copy" is the dtype change
where one is asked for, into one buffer reused from batch to batch: with a fresh float32
copy of each batch the one-query scan of the default layer's features ran 1.10-1.19x
slower on this project's 2-core CPU (``benchmarks/bench_scan.py``, side by side; fresh
large tensors are paid for in page faults). The CPU scan asks for none unless it centres
the batches: the matcher converts fp16 features itself, a cache-sized chunk at a time
(:func:`dtm_ops.matching.compute_dtype`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

import torch

M = TypeVar("M")


def feed(
    batches: Iterable[tuple[M, torch.Tensor, torch.Tensor]], device: torch.device, dtype: torch.dtype | None
) -> Iterator[tuple[M, torch.Tensor, torch.Tensor]]:
    """Yield ``(meta, features, valid)`` on ``device``, the next batch's copy already issued.

    Args:
        batches: ``(meta, features Tensor[n, C, H, W], valid Tensor[n, 2])`` on the host;
            pinned for asynchronous copies to CUDA (pageable memory works, synchronously).
        device: where the matcher runs.
        dtype: the matcher's dtype (features are converted on the device, after the copy);
            ``None``: as they come (on the CPU; on CUDA, float16).

    On the CPU a converted batch lives in a buffer that the next batch overwrites: use it
    before asking for the next (features already in ``dtype`` are passed through).
    """
    if device.type != "cuda":
        buffer = torch.empty(0, dtype=dtype or torch.float32)
        for meta, features, valid in batches:
            if dtype is None or features.dtype == dtype:
                yield meta, features, valid
                continue
            if buffer.numel() < features.numel():
                buffer = torch.empty(features.numel(), dtype=dtype)
            yield meta, buffer[: features.numel()].view(features.shape).copy_(features), valid
        return
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def issue(item):
        meta, features, valid = item
        with torch.cuda.stream(side):
            f = features.to(device, non_blocking=True)
            v = valid.to(device, non_blocking=True)
        return meta, f, v, side.record_event()

    it = iter(batches)
    ahead = next(it, None)
    pending = issue(ahead) if ahead is not None else None
    while pending is not None:
        meta, f, v, done = pending
        nxt = next(it, None)
        pending = issue(nxt) if nxt is not None else None  # in flight while `main` matches this one
        main.wait_event(done)
        f.record_stream(main)
        v.record_stream(main)
        yield meta, f.to(dtype or torch.float16), v
