"""The scan's host-to-device feeder (CPU path here; the CUDA path runs in the GPU benchmark)."""

from __future__ import annotations

import torch

from dtm_ops.transfer import feed


def test_feed_keeps_order_and_values_and_converts_dtype():
    batches = [(i, torch.full((2, 3, 4, 5), float(i), dtype=torch.float16), torch.tensor([[4, 5], [i, i]]))
               for i in range(5)]
    out = list(feed(iter(batches), torch.device("cpu"), torch.float32))
    assert [m for m, _, _ in out] == list(range(5))
    for (i, f, v), (_, f0, v0) in zip(out, batches):
        assert f.dtype == torch.float32 and torch.equal(f, f0.float()) and torch.equal(v, v0)
    assert list(feed(iter([]), torch.device("cpu"), torch.float32)) == []
