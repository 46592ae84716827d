"""The scan's host-to-device feeder (CPU path here; the CUDA path runs in the GPU benchmark) and its step."""

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


def test_feed_without_a_dtype_passes_batches_as_they_come():
    """The CPU scan's batches when it does not centre them: the matcher converts fp16 itself."""
    batches = [(i, torch.randn(2, 3, 4, 5).to(dtype), torch.tensor([[4, 5]] * 2))
               for i, dtype in enumerate([torch.float16, torch.float32, torch.float16])]
    out = list(feed(iter(batches), torch.device("cpu"), None))
    assert [m for m, _, _ in out] == [0, 1, 2]
    assert all(f is f0 and v is v0 for (_, f, v), (_, f0, v0) in zip(out, batches))


def test_frames_per_step_by_device():
    """The scan's step: as given; else 32 frames on the CPU, and on CUDA as many frames as
    hold 512 MiB of float16 features, at most 1024 (counts worked out by hand)."""
    from types import SimpleNamespace

    from dtm_ops.search import Searcher

    def step(device: str, features: torch.Tensor, **kw) -> int:
        return Searcher(SimpleNamespace(device=torch.device(device), stride=16), **kw).frames_per_step(features)

    big = torch.empty(2, 256, 68, 120, dtype=torch.float16)  # 4,177,920 bytes a frame in float16
    small = torch.empty(2, 112, 30, 40, dtype=torch.float16)  # 268,800 bytes: 1997 frames in 512 MiB
    assert step("cpu", big) == 32 and step("cpu", small) == 32
    assert step("cuda", big) == 128  # 536,870,912 // 4,177,920
    assert step("cuda", big.float()) == 128  # matched in float16 whatever the store holds
    assert step("cuda", small) == 1024
    assert step("cuda", big, batch_frames=7) == 7 and step("cpu", small, batch_frames=64) == 64
