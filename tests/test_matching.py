"""The matcher against the explicit-loop reference, and its edge cases."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from dtm_ops import matching
from dtm_ops.matching import (
    PatchwiseCosine,
    best_matches,
    best_positions,
    map_shape,
    patchwise_cosine,
    product_chunks,
)
from tests.reference import patchwise_cosine_loop, unit_cells

CASES = [
    # C, H, W, template sizes, valid per frame
    (8, 5, 7, [(1, 1), (2, 3), (3, 2)], [(5, 7), (4, 6), (5, 3)]),
    (16, 9, 4, [(4, 4), (1, 3), (5, 1)], [(9, 4), (2, 2)]),
    (3, 3, 3, [(3, 3), (5, 5), (2, 2)], [(3, 3)]),
    (32, 6, 11, [(2, 7), (6, 11), (1, 2)], [(6, 11), (6, 10), (1, 11)]),
]


def _zero_invalid(feats: np.ndarray, valid: list[tuple[int, int]]) -> np.ndarray:
    feats = feats.copy()
    for n, (r, c) in enumerate(valid):
        feats[n, :, r:, :] = 0
        feats[n, :, :, c:] = 0
    return feats


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
@pytest.mark.parametrize("max_bytes", [None, 1], ids=["one-pass", "chunked"])
@pytest.mark.parametrize("method", ["fold", "slices", "conv", "auto"])
def test_matches_reference_loop(case, dtype, tol, max_bytes, method):
    """``max_bytes=1`` forces one template per chunk and one frame per call (``fold``)."""
    C, H, W, tsizes, valid = case
    rng = np.random.default_rng(hash((C, H, W)) % 2**32)
    feats = _zero_invalid(np.stack([unit_cells(rng, (C, H, W)) for _ in valid]), valid)
    temps = [unit_cells(rng, (C, h, w)) for h, w in tsizes]
    got = patchwise_cosine(
        torch.from_numpy(feats).to(dtype),
        [torch.from_numpy(t).to(dtype) for t in temps],
        torch.tensor(valid),
        method=method,
        **({} if max_bytes is None else {"max_bytes": max_bytes}),
    )
    for k, t in enumerate(temps):
        assert got[k].shape == (len(valid), *map_shape((H, W), t.shape[1:]))
        for n, v in enumerate(valid):
            want = patchwise_cosine_loop(feats[n], t, v)
            g = got[k][n].double().numpy()
            assert np.array_equal(np.isinf(g), np.isinf(want)), f"template {k} frame {n}: mask differs"
            fin = np.isfinite(want)
            np.testing.assert_allclose(g[fin], want[fin], atol=tol, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_position_masks_of_many_sizes_are_the_reference_loops_border_rule(case):
    """All templates' masks at once, on the largest map: inside each template's own map the
    positions the reference loop allows (its finite values), false beyond; templates
    larger than the frame included."""
    C, H, W, tsizes, valid = case
    shapes = [map_shape((H, W), hw) for hw in tsizes]
    shape = (max(s[0] for s in shapes), max(s[1] for s in shapes))
    rows, cols = matching.position_masks(torch.tensor(valid), torch.tensor(tsizes), shape)
    assert rows.shape == (len(valid), len(tsizes), shape[0]) and cols.shape == (len(valid), len(tsizes), shape[1])
    feats = np.zeros((C, H, W))
    for t, ((h, w), (oh, ow)) in enumerate(zip(tsizes, shapes)):
        for n, v in enumerate(valid):
            want = np.zeros(shape, dtype=bool)
            want[:oh, :ow] = np.isfinite(patchwise_cosine_loop(feats, np.zeros((C, h, w)), v))
            got = (rows[n, t, :, None] & cols[n, t, None, :]).numpy()
            assert np.array_equal(got, want), (t, n)


def test_identical_patch_scores_one_at_its_place():
    rng = np.random.default_rng(0)
    feats = unit_cells(rng, (64, 10, 12))
    template = feats[:, 3:6, 4:8].copy()
    maps = patchwise_cosine(torch.from_numpy(feats)[None].float(), [torch.from_numpy(template).float()])
    score, row, col = best_positions(maps[0])
    assert score.item() == pytest.approx(1.0, abs=1e-6)
    # map index = top-left + (h//2, w//2)
    assert (row.item() - 3 // 2, col.item() - 4 // 2) == (3, 4)


def test_object_cut_by_border_scores_by_its_visible_part():
    # Hand-computed: a 2x2 template whose left column hangs off the frame sees only its
    # right column (2 of 4 cells): the mean is 2/4 = 0.5 when those cells match exactly.
    C = 4
    feats = np.zeros((C, 3, 3))
    feats[0] = 1.0  # every cell is e0
    template = np.zeros((C, 2, 2))
    template[0] = 1.0
    maps = patchwise_cosine(torch.from_numpy(feats)[None].float(), [torch.from_numpy(template).float()])
    m = maps[0][0]
    # map index (a, b) -> top-left (a - 1, b - 1); (1, 0) is top-left (0, -1)
    assert m[1, 0].item() == pytest.approx(0.5)
    assert m[1, 1].item() == pytest.approx(1.0)
    assert m[0, 0].item() == pytest.approx(0.25)  # corner: 1 of 4 cells


def test_template_larger_than_frame_has_no_position():
    feats = torch.nn.functional.normalize(torch.randn(2, 8, 3, 3), dim=1)
    maps = patchwise_cosine(feats, [torch.nn.functional.normalize(torch.randn(8, 9, 9), dim=0)])
    score, _, _ = best_positions(maps[0])
    assert torch.isinf(score).all() and (score < 0).all()


def test_module_equals_function_and_rejects_bad_shapes():
    feats = torch.nn.functional.normalize(torch.randn(3, 8, 6, 6), dim=1)
    temps = [torch.nn.functional.normalize(torch.randn(8, 2, 3), dim=0)]
    torch.testing.assert_close(PatchwiseCosine(temps)(feats)[0], patchwise_cosine(feats, temps)[0])
    with pytest.raises(ValueError, match="template 0 must be"):
        patchwise_cosine(feats, [torch.randn(7, 2, 2)])
    with pytest.raises(ValueError, match=r"Tensor\[N, C, H, W\]"):
        patchwise_cosine(feats[0], temps)


def test_group_picks_reports_the_pick_of_each_size_group(monkeypatch):
    fast = {(2, 3): "conv", (3, 3): "slices"}  # every other method made slow for that size
    for name, fn in list(matching._GROUP_METHODS.items()):
        def slowed(f, g, b, fn=fn, name=name):
            if fast[tuple(g.shape[2:])] != name:
                time.sleep(0.02)
            return fn(f, g, b)
        monkeypatch.setitem(matching._GROUP_METHODS, name, slowed)
    monkeypatch.setattr(matching, "_picked", {})
    feats = torch.nn.functional.normalize(torch.randn(4, 8, 6, 7), dim=1)
    temps = [torch.nn.functional.normalize(torch.randn(8, h, w), dim=0) for h, w in [(2, 3), (3, 3), (2, 3)]]
    assert matching.group_picks(temps) == {}
    best_matches(feats, temps)
    assert matching.group_picks(temps) == {(2, 3): {"conv"}, (3, 3): {"slices"}}
    assert matching.group_picks(temps, frames=4) == matching.group_picks(temps)
    assert matching.group_picks(temps, frames=16) == {}  # another batch size: not yet picked
    assert matching.group_picks(temps[:2]) == {(3, 3): {"slices"}}  # one 2x3 template is another group


def test_ties_go_to_first_position():
    smap = torch.tensor([[[0.0, 0.5], [0.5, 0.1]]])
    score, row, col = best_positions(smap)
    assert (score.item(), row.item(), col.item()) == (0.5, 0, 1)


def test_auto_times_each_method_once_and_remembers_the_pick(monkeypatch):
    calls = []
    for name, fn in list(matching._GROUP_METHODS.items()):
        counted = lambda f, g, b, fn=fn, name=name: calls.append(name) or fn(f, g, b)  # noqa: E731
        monkeypatch.setitem(matching._GROUP_METHODS, name, counted)
    monkeypatch.setattr(matching, "_picked", {})
    feats = torch.nn.functional.normalize(torch.randn(4, 8, 6, 7), dim=1)
    temps = [torch.nn.functional.normalize(torch.randn(8, 2, 3), dim=0) for _ in range(3)]
    first = patchwise_cosine(feats, temps)
    (key, pick), = matching._picked.items()
    # a warm-up and two timed runs each, one for a method clearly slower than the best before it
    assert calls.count(pick) == 3 and all(calls.count(m) in (2, 3) for m in matching._GROUP_METHODS)
    assert key == ("maps", "cpu", torch.float32, (8, 6, 7), (3, 8, 2, 3), 3)  # 4 frames: bucket 2**2..2**3-1
    calls.clear()
    again = patchwise_cosine(feats, temps)
    assert calls == [pick]
    for a, b, c in zip(first, again, patchwise_cosine(feats, temps, method="fold" if pick != "fold" else "conv")):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)
    with pytest.raises(ValueError, match="method must be one of"):
        patchwise_cosine(feats, temps, method="fft")


def _clocked_methods(monkeypatch, cost) -> list:
    """The group methods, each advancing a fake clock by ``cost(name, run)`` per timed run
    (``run``: how many timed runs of any method came before); warm-ups (one frame) are free.
    Returns the log of timed runs' method names."""
    clock, runs = [0.0], []
    monkeypatch.setattr(matching.time, "perf_counter", lambda: clock[0])
    for name, fn in list(matching._GROUP_METHODS.items()):
        def timed(f, g, b, fn=fn, name=name):
            if len(f) > 1:
                clock[0] += cost(name, len(runs))
                runs.append(name)
            return fn(f, g, b)
        monkeypatch.setitem(matching._GROUP_METHODS, name, timed)
    monkeypatch.setattr(matching, "_picked", {})
    monkeypatch.setattr(matching, "_pick_times", {})
    return runs


def test_a_method_clearly_slower_than_the_best_so_far_is_timed_once(monkeypatch):
    """On a clock the methods advance (1, 3 and 1.5 units a batch, in the order they are
    tried): the one that took more than SURE_SLOWER times the best before it runs once,
    the others twice; the fastest is picked."""
    cost = dict(zip(matching._GROUP_METHODS, (1.0, 3.0, 1.5)))
    assert matching.SURE_SLOWER * min(cost.values()) < 3.0
    runs = _clocked_methods(monkeypatch, lambda name, run: cost[name])
    feats = torch.nn.functional.normalize(torch.randn(4, 8, 6, 7), dim=1)
    temps = [torch.nn.functional.normalize(torch.randn(8, 2, 3), dim=0)]
    patchwise_cosine(feats, temps)
    slow = max(cost, key=cost.get)
    assert {name: runs.count(name) for name in cost} == {name: 1 if name == slow else 2 for name in cost}
    assert list(matching._picked.values()) == [min(cost, key=cost.get)]
    assert list(matching._pick_times.values()) == [min(cost.values())]


@pytest.mark.parametrize("costs", [(1.0, 1.2, 1.5), (1.0, 2.5, 3.0)])
def test_a_method_that_fails_its_second_run_is_left_out(monkeypatch, caplog, costs):
    """The fastest method runs once, then runs out of memory: it is logged and not picked,
    and the result is the next fastest's, equal to the reference loop's, whether or not
    that one's first run was clearly slower than the failed method's."""
    base = dict(zip(matching._GROUP_METHODS, costs))
    fastest = min(base, key=base.get)

    def cost(name, run):
        if name == fastest and run > 0:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")
        return base[name]

    _clocked_methods(monkeypatch, cost)
    rng = np.random.default_rng(5)
    valid = [(6, 7), (5, 7), (6, 4)]
    feats = _zero_invalid(np.stack([unit_cells(rng, (8, 6, 7)) for _ in valid]), valid)
    temps = [unit_cells(rng, (8, 2, 3))]
    with caplog.at_level("WARNING", logger="dtm_ops.matching"):
        score, row, col = best_matches(torch.from_numpy(feats).float(), [torch.from_numpy(t).float() for t in temps],
                                       torch.tensor(valid))
    second = sorted(base, key=base.get)[1]
    assert list(matching._picked.values()) == [second]
    assert list(matching._pick_times.values()) == [pytest.approx(base[second])]
    assert [f"{fastest!r} cannot run" in r.getMessage() for r in caplog.records] == [True]
    want, at = _best_reference(feats, temps, valid)
    np.testing.assert_allclose(score.double().numpy(), want, atol=1e-5, rtol=0)
    assert (row.numpy() == at[..., 0]).all() and (col.numpy() == at[..., 1]).all()


class CompilationError(Exception):
    """As Triton raises for a kernel that does not compile for a GPU."""


CompilationError.__module__ = "triton.compiler.errors"


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
                                   NotImplementedError("no kernel for 'Half'"), CompilationError("at 12:4: bad"),
                                   TypeError("a bug in the call")])
def test_auto_leaves_out_a_method_that_cannot_run_here_and_says_so(monkeypatch, caplog, error):
    """A method that raises while it is timed because the device cannot run it (out of
    memory, no kernel) is logged by name and not picked; the others' pick gives the
    reference loop's result. An error of the call itself (a TypeError) is raised."""
    ran = []

    def broken(f, g, b):
        ran.append(len(f))
        raise error

    monkeypatch.setitem(matching._GROUP_METHODS, "slices", broken)
    monkeypatch.setattr(matching, "_picked", {})
    rng = np.random.default_rng(3)
    valid = [(6, 7), (5, 7), (6, 4)]
    feats = _zero_invalid(np.stack([unit_cells(rng, (8, 6, 7)) for _ in valid]), valid)
    temps = [unit_cells(rng, (8, 2, 3)), unit_cells(rng, (8, 3, 3))]
    args = (torch.from_numpy(feats).float(), [torch.from_numpy(t).float() for t in temps], torch.tensor(valid))
    if isinstance(error, TypeError):
        with pytest.raises(TypeError, match="a bug in the call"):
            best_matches(*args)
        return
    with caplog.at_level("WARNING", logger="dtm_ops.matching"):
        score, row, col = best_matches(*args)
    assert ran == [1, 1]  # each size group tried it once (its warm-up on one frame) and left it out
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and all("'slices' cannot run" in s and str(error).split(".")[0] in s for s in said)
    assert "slices" not in matching._picked.values() and len(matching._picked) == 2
    want, at = _best_reference(feats, temps, valid)
    np.testing.assert_allclose(score.double().numpy(), want, atol=1e-5, rtol=0)
    assert (row.numpy() == at[..., 0]).all() and (col.numpy() == at[..., 1]).all()


def test_auto_raises_the_first_error_when_no_method_can_run(monkeypatch):
    for k, name in enumerate(matching._GROUP_METHODS):
        def broken(f, g, b, k=k):
            raise torch.OutOfMemoryError(f"out of memory in method {k}")
        monkeypatch.setitem(matching._GROUP_METHODS, name, broken)
    monkeypatch.setattr(matching, "_picked", {})
    feats = torch.nn.functional.normalize(torch.randn(2, 8, 6, 7), dim=1)
    with pytest.raises(torch.OutOfMemoryError, match="in method 0"):
        best_matches(feats, [torch.nn.functional.normalize(torch.randn(8, 2, 3), dim=0)])
    assert matching._picked == {}


def test_auto_takes_the_size_groups_where_the_spectral_method_cannot_run(monkeypatch, caplog):
    from dtm_ops import spectral

    def broken(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (spectra)")

    monkeypatch.setattr(spectral, "best_matches", broken)
    monkeypatch.setattr(matching, "_picked", {})
    torch.manual_seed(7)
    x = torch.nn.functional.normalize(torch.randn(4, 32, 10, 14), dim=1)
    sizes = [(h, w) for h in (2, 4, 6) for w in (3, 5, 9)]
    temps = [torch.nn.functional.normalize(torch.randn(32, h, w), dim=0) for h, w in sizes]
    assert spectral.weighed(torch.float32, (10, 14), 32, sizes, "cpu")
    with caplog.at_level("WARNING", logger="dtm_ops.matching"):
        got = best_matches(x, temps)
    assert ["'fft' cannot run" in r.getMessage() for r in caplog.records] == [True]
    assert matching.set_picks(temps) == {"groups"}
    want = best_matches(x.double(), [t.double() for t in temps], method="slices")
    torch.testing.assert_close(got[0].double(), want[0].double(), atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def _best_reference(feats: np.ndarray, temps: list[np.ndarray], valid) -> tuple[np.ndarray, np.ndarray]:
    """Best score and (row, col) per template and frame from the explicit loop: ``[T, N]``,
    ``[T, N, 2]``; ties to the first position in row-major order (np.argmax)."""
    score = np.empty((len(temps), len(valid)))
    at = np.empty((len(temps), len(valid), 2), dtype=np.int64)
    for k, t in enumerate(temps):
        for n, v in enumerate(valid):
            m = patchwise_cosine_loop(feats[n], t, v)
            i = int(np.argmax(m))
            score[k, n] = m.flat[i]
            at[k, n] = divmod(i, m.shape[1])
    return score, at


def _check_best(method: str, max_bytes: int | None) -> None:
    for C, H, W, tsizes, valid in CASES:
        rng = np.random.default_rng(hash((C, H, W, 1)) % 2**32)
        feats = _zero_invalid(np.stack([unit_cells(rng, (C, H, W)) for _ in valid]), valid)
        temps = [unit_cells(rng, (C, h, w)) for h, w in tsizes + tsizes[:1]]  # a repeated size: a group of 2
        want, at = _best_reference(feats, temps, valid)
        score, row, col = best_matches(
            torch.from_numpy(feats).float(), [torch.from_numpy(t).float() for t in temps], torch.tensor(valid),
            method=method, **({} if max_bytes is None else {"max_bytes": max_bytes}),
        )
        np.testing.assert_allclose(score.double().numpy(), want, atol=1e-5, rtol=0)
        fin = np.isfinite(want)
        assert (row.numpy()[fin] == at[..., 0][fin]).all() and (col.numpy()[fin] == at[..., 1][fin]).all()


@pytest.mark.parametrize("method", ["fold", "slices", "conv", "fft", "auto"])
@pytest.mark.parametrize("max_bytes", [None, 1], ids=["one-pass", "chunked"])
def test_best_matches_equal_the_reference_loop(method, max_bytes):
    _check_best(method, max_bytes)


def test_gpu_kernel_equals_the_reference_loop_under_the_triton_interpreter():
    """The Triton kernel of :mod:`dtm_ops.shiftmax`, run by Triton's interpreter on CPU
    tensors (the same kernel code the GPU compiles), against the explicit loop."""
    import subprocess
    import sys

    pytest.importorskip("triton", reason="Triton is not installed (it ships with torch's Linux wheels)")
    # the default launch settings, then each other compiled form of the kernel
    code = ("from tests.test_matching import _check_best; from dtm_ops import shiftmax\n"
            "_check_best('shift', None); _check_best('shift', 1)\n"
            "for v in ({'unroll': False}, {'elements': 64}):\n"
            "    shiftmax.TUNING.update(v); _check_best('shift', None)")
    env = {**__import__("os").environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                          cwd=__import__("pathlib").Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]


def test_shift_needs_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    feats = torch.nn.functional.normalize(torch.randn(2, 8, 5, 5), dim=1)
    with pytest.raises(ValueError, match="it needs CUDA and Triton"):
        best_matches(feats, [torch.nn.functional.normalize(torch.randn(8, 2, 2), dim=0)], method="shift")


@pytest.mark.parametrize("n,m,pair,budget", [(5, 3, 10, 25), (7, 4, 3, 1000), (3, 2, 100, 1), (1, 9, 8, 40)])
def test_product_chunks_cover_each_pair_once_within_the_budget(n, m, pair, budget):
    seen = np.zeros((n, m), dtype=int)
    for fs, ts in product_chunks(n, m, pair, budget):
        seen[fs, ts] += 1
        size = len(range(n)[fs]) * len(range(m)[ts]) * pair
        assert size <= budget or size == pair  # over budget only when one pair alone is
    assert (seen == 1).all()


def test_product_chunks_by_hand():
    # 2 templates of 10 bytes fit 25; then 1 frame per chunk (2 frames x 2 x 10 > 25)
    assert product_chunks(5, 3, 10, 25)[:2] == [(slice(0, 1), slice(0, 2)), (slice(1, 2), slice(0, 2))]
    assert len(product_chunks(5, 3, 10, 25)) == 10


@pytest.mark.parametrize("m,flip", [(1, False), (1, True), (3, False)])
def test_template_cells_are_a_contiguous_matrix_in_template_row_column_order(m, flip):
    """One row per template cell, by hand; contiguous also for one template, where a plain
    reshape is a transposed view (the slow, unaligned GEMM operand)."""
    g = torch.randn(m, 5, 3, 4)
    cells = matching.template_cells(g, flip=flip)
    assert cells.shape == (m * 12, 5) and cells.is_contiguous()
    for k in range(m):
        for u in range(3):
            for v in range(4):
                src = g[k, :, 2 - u, 3 - v] if flip else g[k, :, u, v]
                assert torch.equal(cells[k * 12 + u * 4 + v], src)


def test_size_groups_at_uneven_places_land_in_their_own_rows():
    """Templates of one size at indices 0, 1, 3 (not evenly spaced: results placed through an
    index tensor) and of another at 2 and 4 (evenly spaced: through a slice), against the
    explicit loop."""
    rng = np.random.default_rng(5)
    valid = [(6, 7), (5, 6), (6, 4)]
    feats = _zero_invalid(np.stack([unit_cells(rng, (8, 6, 7)) for _ in valid]), valid)
    temps = [unit_cells(rng, (8, *hw)) for hw in [(2, 3), (2, 3), (3, 1), (2, 3), (3, 1)]]
    assert isinstance(matching._rows([0, 1, 3], torch.device("cpu")), torch.Tensor)
    assert matching._rows([2, 4], torch.device("cpu")) == slice(2, 5, 2)
    want, at = _best_reference(feats, temps, valid)
    score, row, col = best_matches(torch.from_numpy(feats).float(), [torch.from_numpy(t).float() for t in temps],
                                   torch.tensor(valid), method="fold")
    np.testing.assert_allclose(score.double().numpy(), want, atol=1e-5, rtol=0)
    assert (row.numpy() == at[..., 0]).all() and (col.numpy() == at[..., 1]).all()


@pytest.mark.parametrize("method", ["fold", "slices", "conv", "fft", "auto"])
def test_fp16_features_on_the_cpu_are_matched_as_their_float32_values(monkeypatch, method):
    """On the CPU, fp16 features are matched in float32 (compute_dtype), converted a chunk
    of frames at a time (here 2 of the 5, by a small CPU_CONVERT_BYTES): the results of
    the float32 values of the features, to float32 rounding (the GEMMs of 2 frames and of
    5 may add in another order; ``auto`` may pick another method for the other dtype)."""
    monkeypatch.setattr(matching, "CPU_CONVERT_BYTES", 2 * 8 * 6 * 7 * 4)
    monkeypatch.setattr(matching.torch, "get_num_threads", lambda: 1)  # chunks of 2, whatever the machine
    chunks = []
    products = matching._products
    monkeypatch.setattr(matching, "_products", lambda c, f: chunks.append((f.dtype, len(f))) or products(c, f))
    matmul = torch.matmul
    monkeypatch.setattr(matching.torch, "matmul", lambda a, b, **k: chunks.append(("matmul", b.dtype, len(b)))
                        or matmul(a, b, **k))
    g = torch.Generator().manual_seed(3)
    feats = torch.nn.functional.normalize(torch.randn(5, 8, 6, 7, generator=g), dim=1).half()
    temps = [torch.nn.functional.normalize(torch.randn(8, h, w, generator=g), dim=0)
             for h, w in [(2, 3), (3, 3), (1, 1), (2, 3)]]
    valid = torch.tensor([[6, 7], [5, 7], [6, 5], [4, 4], [6, 7]])
    assert matching.compute_dtype(feats) == torch.float32
    got = best_matches(feats, temps, valid, method=method)
    if method in ("fold", "slices"):  # each group's 5 frames multiplied 2, 2 and 1 at a time, in float32
        groups = len({t.shape for t in temps})
        assert chunks[:4] == [(torch.float16, 5), ("matmul", torch.float32, 2), ("matmul", torch.float32, 2),
                              ("matmul", torch.float32, 1)]
        assert chunks.count((torch.float16, 5)) == groups
    want = best_matches(feats.float(), temps, valid, method=method)
    assert got[0].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-6)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # the same best positions
    if method != "fft":
        for a, b in zip(patchwise_cosine(feats, temps, valid, method=method),
                        patchwise_cosine(feats.float(), temps, valid, method=method)):
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("n, budget_frames, threads, step", [
    (32, 7.8, 2, 8),  # 4 MiB of 112x30x40 float32 frames: 5 chunks of 6.4 -> 4 of 8, not 7 (odd: slow)
    (32, 7.8, 1, 7),  # one thread: 5 chunks of 7 (the last 4)
    (32, 16, 4, 16),
    (32, 3, 4, 4),  # at least one frame a thread
    (5, 8, 2, 5),  # fewer than the budget: one chunk, whatever its parity
    (2, 0.5, 2, 2),  # a frame over the budget: one at a time, rounded up to the threads
])
def test_frames_converted_at_a_time(monkeypatch, n, budget_frames, threads, step):
    frame_bytes = 112 * 30 * 40 * 4
    monkeypatch.setattr(matching, "CPU_CONVERT_BYTES", int(budget_frames * frame_bytes))
    monkeypatch.setattr(matching.torch, "get_num_threads", lambda: threads)
    assert matching._convert_frames(n, frame_bytes) == step
