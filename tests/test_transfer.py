"""The scan's host-to-device feeder (CPU path here; the CUDA path runs in the GPU benchmark)."""

from __future__ import annotations

import torch

from dtm_ops.transfer import feed


def test_feed_keeps_order_and_values_and_converts_dtype():
    """Each batch checked before the next is asked for (on the CPU the converted batches
    share one buffer); sizes that shrink and grow again, and a batch already float32."""
    sizes = [2, 2, 1, 3, 2]
    batches = [(i, torch.full((n, 3, 4, 5), float(i) + 0.25, dtype=torch.float16), torch.tensor([[4, 5]] * n))
               for i, n in enumerate(sizes)]
    batches.append((5, torch.randn(2, 3, 4, 5), torch.tensor([[4, 5]] * 2)))
    seen = []
    for (i, f, v), (_, f0, v0) in zip(feed(iter(batches), torch.device("cpu"), torch.float32), batches):
        assert f.dtype == torch.float32 and f.shape == f0.shape and torch.equal(v, v0)
        assert torch.equal(f, f0.float())
        seen.append(i)
    assert seen == list(range(6))
    assert list(feed(iter([]), torch.device("cpu"), torch.float32)) == []
