"""The spectral method (dtm_ops.spectral) against torch.fft and the explicit-loop reference."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

from dtm_ops import matching, spectral
from dtm_ops.matching import best_matches, map_shape
from tests.reference import patchwise_cosine_loop, unit_cells


def _frames(rng, n, C, H, W, valid):
    x = np.stack([unit_cells(rng, (C, H, W)) for _ in range(n)])
    for k, (r, c) in enumerate(valid):
        x[k, :, r:] = 0
        x[k, :, :, c:] = 0
    return x


def test_fft_length_is_the_smallest_5_smooth_length_at_least_n():
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    for n in range(1, 400):
        got = spectral.fft_length(n)
        assert got >= n and smooth(got) and not any(smooth(m) for m in range(n, got))
    assert [spectral.fft_length(n) for n in (7, 11, 13, 17, 31, 46)] == [8, 12, 15, 18, 32, 48]


@pytest.mark.parametrize("grid,sizes", [((9, 11), [(2, 3), (5, 4)]), ((6, 5), [(1, 1)]), ((4, 4), [(7, 3)])])
def test_transforms_equal_torch_fft(grid, sizes):
    """The GEMM transforms against torch.fft: forward is rfft2 of the zero-padded frame; the
    inverse is irfft2, cropped to the maps' rows and columns."""
    torch.manual_seed(0)
    H, W = grid
    p = spectral.plan(grid, tuple(sizes), torch.device("cpu"))
    x = torch.randn(3, 5, H, W)
    want = torch.fft.rfft2(x, s=(p.P, p.Q))  # [n, C, P, Qh]
    got = spectral.frame_spectra(x, p)  # [n, 2, K, C]
    got = torch.complex(got[:, 0], got[:, 1]).view(3, p.P, p.qh, 5).permute(0, 3, 1, 2)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)

    y = torch.randn(2, p.P, p.qh, 3, 4)  # [(re, im), K, n, T] of real signals' spectra
    spec = torch.fft.rfft2(torch.randn(3, 4, p.P, p.Q)).permute(2, 3, 0, 1)  # Hermitian where it must be
    y[0], y[1] = spec.real, spec.imag
    want = torch.fft.irfft2(torch.complex(y[0], y[1]).permute(2, 3, 0, 1), s=(p.P, p.Q))
    got = spectral.inverse(y.view(2, p.frequencies, 3, 4), p)  # [hout, wout, n, T]
    torch.testing.assert_close(got.permute(2, 3, 0, 1), want[:, :, : p.hout, : p.wout], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("three_min", [spectral.THREE_PRODUCTS_MIN, 1], ids=["four-products", "three-products"])
def test_sums_are_the_maps_of_the_reference_loop_times_cells(monkeypatch, three_min):
    """Every position of every map, not only the best: the sums over cells (before the
    border rule) divided by ``h*w`` are the loop's scores wherever the rule allows one;
    with either form of the channel sums."""
    monkeypatch.setattr(spectral, "THREE_PRODUCTS_MIN", three_min)
    rng = np.random.default_rng(7)
    C, H, W = 6, 7, 9
    valid = [(7, 9), (4, 5)]
    x = _frames(rng, 2, C, H, W, valid)
    sizes = [(3, 3), (2, 5), (7, 9), (1, 1), (4, 2)]
    temps = [unit_cells(rng, (C, h, w)) for h, w in sizes]
    s = spectral.sums(torch.from_numpy(x).float(), [torch.from_numpy(t).float() for t in temps])
    for k, (h, w) in enumerate(sizes):
        oh, ow = map_shape((H, W), (h, w))
        for n, v in enumerate(valid):
            want = patchwise_cosine_loop(x[n], temps[k], v)
            got = s[:oh, n, k, :ow].double().numpy() / (h * w)
            fin = np.isfinite(want)
            np.testing.assert_allclose(got[fin], want[fin], atol=1e-6, rtol=0)


@pytest.mark.parametrize("three_min", [spectral.THREE_PRODUCTS_MIN, 1], ids=["four-products", "three-products"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-2)])
def test_best_matches_by_fft_equal_the_direct_methods(monkeypatch, dtype, tol, three_min):
    """Many templates of several sizes (the method's case) on frames with padding; the same
    best positions as the direct method, scores within the dtype's tolerance; with either
    form of the channel sums."""
    monkeypatch.setattr(spectral, "THREE_PRODUCTS_MIN", three_min)
    torch.manual_seed(3)
    H, W = 12, 16
    valid = torch.tensor([[12, 16], [8, 11], [12, 5], [2, 16]])
    x = torch.from_numpy(_frames(np.random.default_rng(3), 4, 24, H, W, valid.tolist())).float()
    sizes = [(2, 1), (3, 2), (4, 3), (6, 4), (8, 6)] * 5
    temps = [torch.nn.functional.normalize(torch.randn(24, h, w), dim=0) for h, w in sizes]
    want = best_matches(x.double(), [t.double() for t in temps], valid, method="slices")
    got = best_matches(x.to(dtype), [t.to(dtype) for t in temps], valid, method="fft")
    torch.testing.assert_close(got[0].double(), want[0].double(), atol=tol, rtol=0)
    if dtype == torch.float32:
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


@pytest.mark.parametrize("kept", [0, 1 << 30], ids=["memory-returned", "memory-kept"])
def test_cpu_passes_are_larger_where_freed_memory_is_kept(monkeypatch, kept):
    """On the CPU the frames go through in passes of CPU_CHUNK_FRAMES, or of
    CPU_CHUNK_FRAMES_KEPT where the process keeps freed memory (a scan's), and either way
    every frame gets the direct method's best position and score."""
    from dtm_ops import allocator

    monkeypatch.setattr(allocator, "kept", lambda: kept)
    passes: list[int] = []
    forward = spectral.frame_spectra
    monkeypatch.setattr(spectral, "frame_spectra", lambda f, p: passes.append(len(f)) or forward(f, p))
    n, H, W = 40, 6, 8
    rows = [(H, W), (4, W), (H, 5)] * (n // 3) + [(H, W)] * (n % 3)
    valid = torch.tensor(rows)
    x = torch.from_numpy(_frames(np.random.default_rng(5), n, 8, H, W, rows)).float()
    temps = [torch.nn.functional.normalize(torch.randn(8, h, w), dim=0) for h, w in [(2, 1), (3, 2), (2, 4)]]
    got = spectral.best_matches(x, temps, valid, max_bytes=1 << 40)
    step = spectral.CPU_CHUNK_FRAMES_KEPT if kept else spectral.CPU_CHUNK_FRAMES
    assert spectral.CPU_CHUNK_FRAMES < spectral.CPU_CHUNK_FRAMES_KEPT < n
    assert passes == [step] * (n // step) + [n % step]
    want = best_matches(x.double(), [t.double() for t in temps], valid, method="slices")
    torch.testing.assert_close(got[0].double(), want[0].double(), atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def _crops_and_random(x: torch.Tensor, sizes, seed: int) -> list[torch.Tensor]:
    """Templates for ``x (Tensor[n, C, H, W])``: a cut of a frame (plus noise) for every
    other size, a random one for the rest; unit-norm per cell."""
    g = torch.Generator().manual_seed(seed)
    n, C, H, W = x.shape
    out = []
    for k, (h, w) in enumerate(sizes):
        noise = torch.randn(C, h, w, generator=g)
        if k % 2 == 0:
            i, j = (3 * k) % (H - h + 1), (5 * k) % (W - w + 1)
            noise = x[k % n, :, i : i + h, j : j + w].double() + 0.3 * noise / C**0.5
        out.append(torch.nn.functional.normalize(noise.double(), dim=0))
    return out


def _assert_same_best(got, x: torch.Tensor, temps, valid, atol: float, margin: float = 1e-3) -> None:
    """``got`` (score, row, col) against the maps of the direct method in fp64: scores within
    ``atol``; positions the same wherever the reference's best beats every other position
    by more than ``margin`` (closer ones may swap within rounding), and those are most."""
    maps = matching.patchwise_cosine(x.double(), [t.double() for t in temps], valid, method="slices")
    clear = 0
    for k, m in enumerate(maps):
        flat = m.flatten(1)
        top = flat.topk(2, dim=1)
        torch.testing.assert_close(got[0][k].double().cpu(), top.values[:, 0].double(), atol=atol, rtol=0)
        for n in range(len(flat)):
            if top.values[n, 0] - top.values[n, 1] > margin:
                clear += 1
                assert divmod(int(top.indices[n, 0]), m.shape[2]) == (int(got[1][k, n]), int(got[2][k, n])), (k, n)
    assert clear >= len(maps) * len(x) // 2


def test_fp16_transforms_find_the_fp32_positions_within_fp16_tolerance():
    """The forward transforms in fp16, as for fp16 features on CUDA (here forced on the CPU,
    where the products fall back to fp32 copies of the fp16 spectra): spectra in fp16, and
    the scores of the direct method in fp64 on the same fp16 values within 3e-4 (7e-5 here)."""
    H, W = 14, 18
    valid = torch.tensor([[14, 18], [10, 13], [14, 7]])
    x = torch.from_numpy(_frames(np.random.default_rng(8), 3, 96, H, W, valid.tolist())).half()
    temps = [t.half() for t in _crops_and_random(x, [(2, 3), (5, 7), (3, 3), (7, 9)] * 3, 8)]
    assert spectral.transform_dtype(x) == torch.float32  # fp16 transforms on CUDA only
    p = spectral.plan_for(x, temps, torch.float16)
    assert spectral.frame_spectra(x, p).dtype == spectral.cached_spectra(temps, p).dtype == torch.float16
    assert not spectral.three_products(1000, p.dw.dtype) and spectral.three_products(1000, torch.float32)
    got = spectral.best_matches(x, temps, valid, 1 << 30, torch.float16)
    _assert_same_best(got, x, temps, valid, atol=3e-4)


def test_fp16_products_come_out_in_fp32_without_overflow():
    """Channel sums of fp16 spectra: fp32 out, equal to the fp32 products of the same
    values, also where fp16 sums would overflow (65504)."""
    torch.manual_seed(9)
    a = (torch.rand(5, 3, 256) * 300).half()
    b = (torch.rand(5, 256, 4) * 30).half()
    got = spectral._bmm_float32(a, b)
    assert got.dtype == torch.float32 and got.max() > 65504
    torch.testing.assert_close(got, torch.bmm(a.float(), b.float()))


def test_auto_times_the_spectral_method_for_many_templates_only(monkeypatch):
    """``auto`` weighs the spectral method for a set of templates where its arithmetic is
    the smaller, once per set of sizes, and keeps the faster of it and the per-group picks;
    for one small template it does not try it."""
    monkeypatch.setattr(matching, "_picked", {})
    calls = []
    real = spectral.best_matches
    monkeypatch.setattr(spectral, "best_matches", lambda *a: calls.append(len(a[0])) or real(*a))
    torch.manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(8, 32, 10, 14), dim=1)
    few = [torch.nn.functional.normalize(torch.randn(32, 2, 2), dim=0)]
    many = [torch.nn.functional.normalize(torch.randn(32, h, w), dim=0) for h, w in [(6, 8), (9, 12)] * 8]
    sizes = spectral.sizes_of(many)
    assert spectral.estimated_macs((10, 14), 32, sizes) < spectral.direct_macs((10, 14), 32, sizes)
    assert spectral.estimated_macs((10, 14), 32, [(2, 2)]) > spectral.direct_macs((10, 14), 32, [(2, 2)])

    best_matches(x, few)
    best_matches(x.double(), [t.double() for t in many])  # float64 asks for more than its fp32
    assert calls == [] and not [k for k in matching._picked if k[0] == "best-set"]
    first = best_matches(x, many)
    assert calls == [1, 8, 8]  # a warm-up on one frame, then two timed runs
    (key, pick), = [(k, v) for k, v in matching._picked.items() if k[0] == "best-set"]
    assert key == ("best-set", "cpu", torch.float32, (32, 10, 14), (((6, 8), (9, 12)), 16), 4)
    assert matching.set_picks(many) == {pick} and matching.set_picks(few) == set()
    calls.clear()
    again = best_matches(x, many)
    assert calls == ([8] if pick == "fft" else [])
    want = best_matches(x, many, method="slices")
    for a, b, c in zip(first, again, want):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


def _slowed(monkeypatch, group_seconds: float = 0.0, fft_seconds: float = 0.0) -> None:
    """Every direct method made ``group_seconds`` slower a call, the spectral method
    ``fft_seconds``; the picks start afresh."""
    import time

    for name, fn in list(matching._GROUP_METHODS.items()):
        monkeypatch.setitem(matching._GROUP_METHODS, name,
                            lambda f, g, b, fn=fn: time.sleep(group_seconds) or fn(f, g, b))
    real = spectral.best_matches
    monkeypatch.setattr(spectral, "best_matches", lambda *a: time.sleep(fft_seconds) or real(*a))
    monkeypatch.setattr(matching, "_picked", {})
    monkeypatch.setattr(matching, "_pick_times", {})


@pytest.mark.parametrize("slow", ["groups", "fft"])
def test_auto_stops_picking_size_groups_once_they_cannot_beat_the_spectral_method(monkeypatch, slow):
    """For a set of many sizes, ``auto`` times the spectral method first, then picks the
    size groups one by one while their picks' times add up to less than its time. Each
    group slowed by more than the spectral method takes: one group is picked, the set goes
    to the spectral method. The spectral method slowed instead: every group is picked, the
    set goes to the groups. The scores are the direct method's either way."""
    _slowed(monkeypatch, group_seconds=0.05 if slow == "groups" else 0.0, fft_seconds=0.5 if slow == "fft" else 0.0)
    torch.manual_seed(6)
    x = torch.nn.functional.normalize(torch.randn(8, 32, 10, 14), dim=1)
    sizes = [(h, w) for h in (2, 4, 6) for w in (3, 5, 9)] * 2  # 9 sizes of 2 templates
    temps = [torch.nn.functional.normalize(torch.randn(32, h, w), dim=0) for h, w in sizes]
    assert spectral.weighed(torch.float32, (10, 14), 32, sizes, "cpu")
    got = best_matches(x, temps)
    groups = [k for k in matching._picked if k[0] == "best" and k[5] == len(x).bit_length()]
    assert len(groups) == (1 if slow == "groups" else 9)
    assert matching.set_picks(temps) == ({"fft"} if slow == "groups" else {"groups"})
    want = best_matches(x.double(), [t.double() for t in temps], method="slices")
    torch.testing.assert_close(got[0].double(), want[0].double(), atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_template_spectra_are_kept_for_the_same_tensors_and_remade_when_one_changes():
    torch.manual_seed(2)
    x = torch.nn.functional.normalize(torch.randn(3, 8, 7, 9), dim=1)
    temps = [torch.nn.functional.normalize(torch.randn(8, h, w), dim=0) for h, w in [(3, 3), (2, 4)]]
    p = spectral.plan((7, 9), spectral.sizes_of(temps), x.device)
    first = spectral.cached_spectra(temps, p)
    assert spectral.cached_spectra(temps, p) is first
    assert spectral.cached_spectra(list(temps), p) is first  # a new list of the same tensors
    temps[1].mul_(-1)  # changed in place: the scores must follow
    assert spectral.cached_spectra(temps, p) is not first
    got = best_matches(x, temps, method="fft")
    want = best_matches(x, temps, method="slices")
    torch.testing.assert_close(got[0], want[0])
    copies = [t.clone() for t in temps]  # other tensors, same values: computed again
    assert spectral.cached_spectra(copies, p) is not spectral.cached_spectra(temps, p)
    assert len(spectral._spectra) <= spectral.SPECTRA_CACHE


def test_template_spectra_go_when_their_templates_are_freed():
    torch.manual_seed(4)
    spectral._spectra.clear()
    temps = [torch.nn.functional.normalize(torch.randn(8, 3, 3), dim=0) for _ in range(2)]
    kept = [torch.nn.functional.normalize(torch.randn(8, 2, 2), dim=0)]
    p = spectral.plan((7, 9), ((3, 3),), torch.device("cpu"))
    spectral.cached_spectra(temps, p)
    spectral.cached_spectra(kept, p)
    assert len(spectral._spectra) == 2
    del temps[1]  # one of the list's tensors freed: its entry goes, the other stays
    gc.collect()
    assert len(spectral._spectra) == 1
    (refs, _, _, _), = spectral._spectra.values()
    assert refs[0]() is kept[0]


def test_auto_does_not_weigh_the_spectral_method_beyond_its_memory_bound(monkeypatch):
    monkeypatch.setattr(matching, "_picked", {})
    torch.manual_seed(5)
    x = torch.nn.functional.normalize(torch.randn(4, 32, 10, 14), dim=1)
    many = [torch.nn.functional.normalize(torch.randn(32, 9, 12), dim=0) for _ in range(16)]
    need = spectral.spectra_bytes((10, 14), 32, spectral.sizes_of(many))
    p = spectral.plan((10, 14), spectral.sizes_of(many), x.device)
    assert need == spectral.template_spectra(many, p).numel() * 4
    assert spectral.template_spectra(many * 4, p).numel() * 4 == spectral.spectra_bytes((10, 14), 32, [(9, 12)] * 64)
    assert spectral.spectra_bytes((10, 14), 32, [(9, 12)] * 64, torch.float16) == need * 4 // 2  # 2T halves
    monkeypatch.setattr(spectral, "SPECTRA_MAX_BYTES", need - 1)
    best_matches(x, many)
    assert not [k for k in matching._picked if k[0] == "best-set"]
    monkeypatch.setattr(spectral, "SPECTRA_MAX_BYTES", need)
    best_matches(x, many)
    assert [k for k in matching._picked if k[0] == "best-set"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the GPU machine)")
def test_spectral_method_on_cuda_equals_the_cpu_reference():
    """fp16 features on the GPU, as a scan holds them (forward transforms in fp16 there):
    the best positions of the direct method in fp64 on the same fp16 values, wherever they
    are clear of rounding, scores within 3e-4 (9e-5 with the fp16 transforms emulated on the CPU)."""
    H, W = 20, 30
    valid = torch.tensor([[20, 30], [14, 22], [20, 9]])
    x = torch.from_numpy(_frames(np.random.default_rng(6), 3, 64, H, W, valid.tolist())).half()
    temps = [t.half() for t in _crops_and_random(x, [(2, 4), (7, 12), (5, 5), (9, 16)] * 4, 6)]
    assert spectral.transform_dtype(x.cuda()) == torch.float16
    got = best_matches(x.cuda(), [t.cuda() for t in temps], valid.cuda(), method="fft")
    _assert_same_best(got, x, temps, valid, atol=3e-4)


@pytest.mark.parametrize("form", ["four", "three", "fp16"])
@pytest.mark.parametrize("block_rows", [1, 4, None])
def test_template_spectra_equal_the_dft_by_its_definition(monkeypatch, form, block_rows):
    """Each template's conjugate spectrum, cell ``(h // 2, w // 2)`` at the origin, summed
    term by term in float64: templates of mixed sizes, odd and even, on one canvas, in the
    stored forms (``[c | d]`` in fp32 and in fp16, as a GPU keeps them, and
    ``(c, d - c, c + d)``), the ``[c | d]`` form made a block of frequency rows at a time
    (1, 4 with a smaller last block, or all)."""
    torch.manual_seed(6)
    C, grid = 5, (6, 7)
    sizes = [(3, 3), (2, 4), (1, 1), (3, 3), (6, 2), (2, 4), (3, 7), (3, 3)]
    temps = [torch.nn.functional.normalize(torch.randn(C, h, w), dim=0) for h, w in sizes]
    dtype = torch.float16 if form == "fp16" else torch.float32
    p = spectral.plan(grid, tuple(sorted(set(sizes))), torch.device("cpu"), dtype)
    monkeypatch.setattr(spectral, "THREE_PRODUCTS_MIN", 1 if form == "three" else 1000)
    row_bytes = 2 * p.qh * C * len(temps) * 4
    monkeypatch.setattr(spectral, "SPECTRA_BLOCK_BYTES", row_bytes * (block_rows or p.P))
    assert block_rows != 4 or p.P % 4  # the last block is smaller
    got = spectral.template_spectra(temps, p)
    assert got.dtype == dtype
    rows, cols = np.meshgrid(np.arange(p.P), np.arange(p.qh), indexing="ij")  # frequencies
    want = np.zeros((p.P, p.qh, C, len(temps)), dtype=complex)
    for n, t in enumerate(temps):
        h, w = t.shape[1:]
        for i in range(h):
            for j in range(w):
                phase = np.exp(-2j * np.pi * ((i - h // 2) * rows / p.P + (j - w // 2) * cols / p.Q))
                want[:, :, :, n] += phase[..., None] * t[:, i, j].double().numpy()
    want = torch.from_numpy(want.conj()).reshape(p.frequencies, C, len(temps))
    re, im = want.real, want.imag
    expect = torch.stack([re, im - re, re + im]) if form == "three" else torch.cat([re, im], dim=2)
    torch.testing.assert_close(got.double(), expect, atol=1e-5 if dtype == torch.float32 else 4e-3, rtol=0)
