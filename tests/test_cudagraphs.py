"""The CUDA-graph cache of the scan (:mod:`dtm_ops.cudagraphs`).

On the CPU, the cache's bookkeeping runs with an emulated graph that, like a real one,
recomputes on the memory of the tensors it was captured with: a replay for the wrong
inputs would give a wrong answer, which the tests compare with calling the function
directly. On CUDA (the GPU machine; skipped elsewhere) the real graphs are checked against
the same calls run eagerly, and a GPU scan with graphs against one without.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dtm_ops.cudagraphs import GraphCache
from dtm_ops.matching import best_matches
from tests.reference import patchwise_cosine_loop, unit_cells

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")


class EmulatedGraphs(GraphCache):
    """GraphCache on the CPU: a "graph" that reruns ``fn`` on the captured tensors and
    writes into the outputs of the capture, as a CUDA graph replays on fixed memory."""

    captures = 0

    def _usable(self, inputs):  # CPU tensors: the emulation stands in for the device
        return True

    def _capture(self, inputs):
        self.captures += 1
        buffers = {i: inputs[i].clone() for i in self.copied}
        baked = tuple(buffers.get(i, t) for i, t in enumerate(inputs))
        outputs = tuple(self.fn(*baked))

        def replay():
            for out, new in zip(outputs, self.fn(*baked)):
                out.copy_(new)

        return replay, buffers, outputs


def scores(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A small function of two inputs: per row, the sum of the first ``v[i]`` entries, and the max."""
    keep = torch.arange(x.shape[1])[None] < v[:, None]
    return (x * keep).sum(1), x.amax(1)


def test_replays_only_for_the_same_buffer_and_reads_its_current_contents():
    cache = EmulatedGraphs(scores)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    v = torch.tensor([1, 2, 6, 0])
    for _ in range(3):  # seen, captured, replayed
        got = cache(a, v)
        assert all(torch.equal(x, y) for x, y in zip(got, scores(a, v)))
    assert cache.captures == 1 and cache.replays == 2
    a.copy_(torch.randn(4, 6))  # new contents in the same buffer: the replay sees them
    assert all(torch.equal(x, y) for x, y in zip(cache(a, v), scores(a, v)))
    # another buffer of the same shape is another key: run directly, never a's graph
    assert all(torch.equal(x, y) for x, y in zip(cache(b, v), scores(b, v)))
    assert cache.replays == 3
    # views of a's memory with another shape, or the same shape and other strides, are other keys
    t = a.as_strided((4, 6), (1, 4))
    assert t.data_ptr() == a.data_ptr() and not torch.equal(t, a)
    assert all(torch.equal(x, y) for x, y in zip(cache(a[:, :5], v), scores(a[:, :5], v)))
    assert all(torch.equal(x, y) for x, y in zip(cache(t, v), scores(t, v)))
    assert cache.captures == 1


def test_copied_inputs_are_keyed_on_shape_and_copied_in_on_every_call():
    cache = EmulatedGraphs(scores, copied=(1,))
    a = torch.randn(4, 6)
    for i in range(5):  # a fresh `valid` each call, other values each time
        v = torch.tensor([i, 6 - i, 3, i % 2])
        got = cache(a, v)
        assert all(torch.equal(x, y) for x, y in zip(got, scores(a, v)))
    assert cache.captures == 1 and cache.replays == 4
    v = torch.tensor([1, 2, 3])  # `valid` of another shape (with fewer frames): not the graph
    assert torch.equal(cache(a[:3], v)[0], scores(a[:3], v)[0]) and cache.replays == 4


def test_outputs_are_copies_and_the_number_of_graphs_is_bounded():
    cache = EmulatedGraphs(scores, max_graphs=1)
    a, b = torch.randn(3, 5), torch.randn(3, 5)
    v = torch.tensor([5, 5, 5])
    cache(a, v)
    first = cache(a, v)[0]
    kept = first.clone()
    a.mul_(2)
    cache(a, v)
    assert torch.equal(first, kept)  # an earlier result is not overwritten by a replay
    for _ in range(3):  # b would be captured second: over the bound, it runs directly
        assert torch.equal(cache(b, v)[0], scores(b, v)[0])
    assert cache.captures == 1 and len(cache.graphs) == 1


def test_off_cuda_the_function_runs_directly():
    calls = []

    def fn(x):
        calls.append(1)
        return (x + 1,)

    cache = GraphCache(fn)
    x = torch.zeros(2)
    for _ in range(3):
        assert torch.equal(cache(x)[0], torch.ones(2))
    assert len(calls) == 3 and not cache.graphs


@cuda
def test_cuda_graphs_of_best_matches_equal_eager_calls_on_alternating_buffers():
    """Two batch buffers refilled in turn, as the scan's feeder leaves them, and a fresh
    ``valid`` per batch; templates of two sizes (two size groups, rows not evenly spaced)."""
    g = torch.Generator().manual_seed(0)
    dev = torch.device("cuda")
    temps = [F.normalize(torch.randn(32, h, w, generator=g), dim=0).to(dev, torch.float16)
             for h, w in ((2, 4), (3, 5), (2, 4))]
    cache = GraphCache(lambda f, v: best_matches(f, temps, v), copied=(1,))
    bufs = [torch.empty(8, 32, 12, 20, device=dev, dtype=torch.float16) for _ in range(2)]
    for step in range(8):
        f = bufs[step % 2]
        f.copy_(F.normalize(torch.randn(8, 32, 12, 20, generator=g), dim=1))
        v = torch.tensor([[12, 20]] * 6 + [[7, 9], [12 - step, 20 - step]], device=dev)
        got, want = cache(f, v), best_matches(f, temps, v)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    assert len(cache.graphs) == 2 and cache.replays == 6


@cuda
def test_a_gpu_scan_with_graphs_finds_what_one_without_finds(tmp_path, monkeypatch):
    import dtm_ops.search as search
    from dtm_ops.fingerprint import Fingerprint
    from dtm_ops.search import PreparedQuery, Query, Searcher
    from dtm_ops.store import FeatureStore
    from dtm_ops.store.format import FrameEntry
    from dtm_ops.templates import Template

    g = torch.Generator().manual_seed(0)
    store = FeatureStore.open(str(tmp_path / "store"))
    fp = Fingerprint("test", "random", "x", 16, 32)
    for s in range(4):
        feats = F.normalize(torch.randn(64, 32, 12, 20, generator=g), dim=1)
        store.append(fp, [FrameEntry(f"f{s}-{i}", f"/lake/{s}/{i}.jpg", f"seq{s}", i, 320, 192, (12, 20), 1.0)
                          for i in range(64)], list(feats))
    prepared = [PreparedQuery(Query(f"q{q}", f"/q/{q}.jpg", [(0, 0, 10, 10)]),
                              [Template(f"q{q}", 0, 1.0, F.normalize(torch.randn(32, h, w, generator=g), dim=0),
                                        (0, 0, w, h)) for h, w in ((2, 3), (3, 4))], None) for q in range(3)]
    caches = []

    class Recorded(GraphCache):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            caches.append(self)

    monkeypatch.setattr(search, "GraphCache", Recorded)
    extractor = SimpleNamespace(device=torch.device("cuda"), stride=16)
    with_graphs = Searcher(extractor, top_k=10, batch_frames=16, cuda_graphs=True).scan(store, prepared)
    without = Searcher(extractor, top_k=10, batch_frames=16).scan(store, prepared)
    assert len(caches) == 1 and caches[0].replays > 0 and not caches[0].failed
    for q in with_graphs:
        assert [(s, k) for s, k, _ in with_graphs[q].items()] == [(s, k) for s, k, _ in without[q].items()]


def test_a_failed_capture_is_logged_once_and_every_call_runs_directly(caplog):
    class Failing(EmulatedGraphs):
        def _capture(self, inputs):
            self.captures += 1
            raise RuntimeError("operation not permitted when stream is capturing")

    cache = Failing(scores)
    a, v = torch.randn(3, 4), torch.tensor([1, 2, 3])
    with caplog.at_level("WARNING", logger="dtm_ops.cudagraphs"):
        for _ in range(4):
            assert torch.equal(cache(a, v)[0], scores(a, v)[0])
    assert cache.captures == 1 and "not permitted" in cache.failed and not cache.graphs
    assert len([r for r in caplog.records if "capture failed" in r.getMessage()]) == 1


def test_the_scan_uses_graphs_only_on_cuda_and_when_asked():
    from dtm_ops.search import Searcher

    def matcher(device: str, **kw):
        return Searcher(SimpleNamespace(device=torch.device(device), stride=16), **kw).batch_matcher([], None)

    assert isinstance(matcher("cuda", cuda_graphs=True), GraphCache)  # made only: no CUDA call yet
    assert not isinstance(matcher("cuda"), GraphCache)
    assert not isinstance(matcher("cpu", cuda_graphs=True), GraphCache)
    # on the CPU, the scan's step: best score and position per frame, as the explicit loop finds them
    rng = np.random.default_rng(0)
    f = torch.from_numpy(unit_cells(rng, (8, 3, 5, 6)).transpose(1, 0, 2, 3).copy()).float()
    t = [torch.from_numpy(unit_cells(rng, (8, 2, 3))).float()]
    valid = [(5, 6), (4, 4), (5, 6)]
    f[1, :, 4:], f[1, :, :, 4:] = 0, 0  # padding cells are zero, as the store holds them
    score, rows, cols = Searcher(SimpleNamespace(device=torch.device("cpu"), stride=16)).batch_matcher(t, None)(
        f, torch.tensor(valid))
    for n, v in enumerate(valid):
        want = patchwise_cosine_loop(f[n].double().numpy(), t[0].double().numpy(), v)
        r, c = np.unravel_index(np.argmax(want), want.shape)
        assert (rows[0, n].item(), cols[0, n].item()) == (r, c)
        assert score[0, n].item() == pytest.approx(want[r, c], abs=1e-5)
