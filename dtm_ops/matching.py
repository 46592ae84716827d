"""Patchwise cosine similarity: the Deep Template Matching score.

For a template ``T (Tensor[C, h, w])`` and frame features ``F (Tensor[C, H, W])``, both
unit-norm per cell::

    S[i, j] = 1 / (h * w) * sum_{u < h, v < w} <T[:, u, v], F[:, i + u, j + v]>

Border rule: objects cut by the frame border are still found, at a cost. The template's
top-left corner ``(i, j)`` may stand anywhere from ``(-(h // 2), -(w // 2))`` on, as long as
at least half of the template's rows (``ceil(h / 2)``) and half of its columns lie on the
frame's valid cells; template cells off the frame (or on its padding) count as similarity
0 in the mean. An
object half outside the frame therefore scores at most about half of a full match.
``Hv, Wv`` are the frame's valid cells (the rest of a padded grid is padding).

Output map index ``(a, b)`` is the position with top-left ``(a - h // 2, b - w // 2)``;
positions that break the rule hold ``-inf``.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Sequence

import torch
from torch import nn

from dtm_ops import picks  # light: no torch at import

log = logging.getLogger(__name__)


def map_shape(grid: tuple[int, int], template: tuple[int, int]) -> tuple[int, int]:
    """Shape of the similarity map of an ``h x w`` template over an ``H x W`` grid."""
    (H, W), (h, w) = grid, template
    return H - h + 1 + 2 * (h // 2), W - w + 1 + 2 * (w // 2)


def _check(features: torch.Tensor, templates: Sequence[torch.Tensor], valid: torch.Tensor | None) -> None:
    if features.ndim != 4:
        raise ValueError(f"features must be Tensor[N, C, H, W], got shape {tuple(features.shape)}")
    c = features.shape[1]
    for k, t in enumerate(templates):
        if t.ndim != 3 or t.shape[0] != c:
            raise ValueError(f"template {k} must be Tensor[{c}, h, w], got shape {tuple(t.shape)}")
        if t.shape[1] < 1 or t.shape[2] < 1:
            raise ValueError(f"template {k} is empty: shape {tuple(t.shape)}")
    if valid is not None and (valid.ndim != 2 or valid.shape != (features.shape[0], 2)):
        raise ValueError(f"valid must be Tensor[N, 2] of (rows, cols), got shape {tuple(valid.shape)}")


def position_mask(valid: torch.Tensor, grid: tuple[int, int], template: tuple[int, int]) -> torch.Tensor:
    """``Tensor[N, oh, ow]`` bool: which map positions obey the border rule per frame.

    Args:
        valid (Tensor[N, 2]): each frame's valid ``(rows, cols)`` of cells.
    """
    h, w = template
    oh, ow = map_shape(grid, template)
    ok_r = _on_valid_cells(valid[:, :1], h, torch.arange(oh, device=valid.device))  # [N, oh]
    ok_c = _on_valid_cells(valid[:, 1:], w, torch.arange(ow, device=valid.device))  # [N, ow]
    return ok_r[:, :, None] & ok_c[:, None, :]


def position_masks(
    valid: torch.Tensor, sizes: torch.Tensor, shape: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`position_mask` of many templates at once, one mask per axis, on a common map
    of ``shape`` (the largest of their maps; each template's own map is its top-left part).

    Args:
        valid (Tensor[N, 2]): each frame's valid ``(rows, cols)`` of cells.
        sizes (Tensor[T, 2]): each template's ``(h, w)``, integers on ``valid``'s device.

    Returns:
        ``(rows Tensor[N, T, oh], cols Tensor[N, T, ow])`` bool, ``(oh, ow) = shape``: position
        ``(a, b)`` obeys the rule for template ``t`` in frame ``n`` where ``rows[n, t, a] &
        cols[n, t, b]``.

    Positions beyond a template's own map come out false by the rule itself: along an axis
    of ``H`` cells every map is ``H`` (odd sizes) or ``H + 1`` long (:func:`map_shape`), and at
    index ``H`` a template of odd size ``h`` has at most ``(h - 1) / 2`` cells on the frame.
    """
    pos = [torch.arange(length, device=valid.device) for length in shape]
    rows, cols = (_on_valid_cells(valid[:, k, None, None], sizes[:, k, None], pos[k]) for k in (0, 1))
    return rows, cols


def _on_valid_cells(valid: torch.Tensor, size, positions: torch.Tensor) -> torch.Tensor:
    """The border rule along one axis: whether a template ``size`` cells long at map index
    ``positions`` (its first cell at ``positions - size // 2``) has at least half of its
    cells (``ceil(size / 2)``) on the frame's first ``valid`` cells. ``size`` is an int or a
    tensor; the arguments broadcast."""
    start = positions - size // 2
    on = torch.minimum(start + size, valid) - start.clamp(min=0)
    return on >= (size + 1) // 2


#: Bound on the intermediate products of one call (the cell-by-cell similarities of the
#: ``"fold"``, ``"slices"`` and ``"shift"`` methods): more are matched in chunks
#: (:func:`product_chunks`).
MAX_PRODUCT_BYTES = 512 << 20

#: On the CPU, products are made and summed in chunks of about this many bytes (at least
#: :data:`CPU_CHUNK_PAIRS` frame-template pairs, so that each operation has work enough to
#: pay its overhead), so that they are summed while still in cache: 1.4-1.5x on large
#: templates on a 2-core machine (``benchmarks/bench_matcher.py``), the same on small ones.
CPU_CHUNK_BYTES = 8 << 20
CPU_CHUNK_PAIRS = 32

#: On the CPU, half-precision features are matched in float32 (:func:`compute_dtype`),
#: converted a chunk of frames of about this many float32 bytes at a time, right before
#: their GEMM reads them, so that they are read from cache and not from memory (8 frames of
#: 112x30x40). The one-query scan from a local folder ran 1.26x as fast (best of 8; 1.37x
#: by median) as with each 32-frame step converted whole first,
#: ``epyc/scan-cpu-fused-convert-ab.txt``.
CPU_CONVERT_BYTES = 4 << 20

#: How a group of same-size templates is matched (:func:`patchwise_cosine`'s ``method``).
METHODS = ("auto", "fold", "slices", "conv")

# "auto" picks per (maps or best, device, dtype, frame grid, channels, template size, group
# size, batch size to a power of 2): the fastest method on first use, timed on that call's
# own frames (as cuDNN's benchmark mode); and the pick's time, in seconds. Both are also
# kept on disk for the machine's later processes (dtm_ops.picks).
_picked: dict[tuple, str] = {}
_pick_times: dict[tuple, float] = {}


def product_chunks(n: int, m: int, pair_bytes: int, max_bytes: int) -> list[tuple[slice, slice]]:
    """``(frames, templates)`` slices whose cell products stay within ``max_bytes``.

    ``pair_bytes`` is the size of one frame's products with one template. Templates are
    split first (a chunk always holds all frames it can), and each chunk holds at least
    one frame and one template."""
    templates = max(1, min(m, max_bytes // max(pair_bytes, 1)))
    frames = max(1, min(n, max_bytes // max(pair_bytes * templates, 1)))
    return [(slice(f, f + frames), slice(t, t + templates))
            for t in range(0, m, templates) for f in range(0, n, frames)]


def template_cells(group: torch.Tensor, flip: bool = False) -> torch.Tensor:
    """The GEMM operand of a size group: ``group (Tensor[m, C, h, w])`` -> ``Tensor[m*h*w, C]``,
    rows in ``(template, u, v)`` order (``flip``: cells reversed in ``u`` and ``v``), contiguous.

    Contiguous on purpose: for one template the reshape would otherwise be a view with a
    leading dimension of ``h*w``, which is not 16-byte aligned for sizes such as 7x12, and
    cuBLAS then takes a slower kernel (on an H200: an Ampere ``align2`` kernel at 1.7 TB/s,
    against 3.7 TB/s for the aligned operand, ``benchmarks/results/speed/h200/parts.txt``).
    """
    m, c, h, w = group.shape
    g = group.flip(2, 3) if flip else group
    return g.reshape(m, c, h * w).transpose(1, 2).reshape(m * h * w, c).contiguous()


def _fold_sum(prod: torch.Tensor, m: int, grid: tuple[int, int], template: tuple[int, int]) -> torch.Tensor:
    """``fold`` (col2im): ``P[n, m*h*w, H*W]`` of flipped cells -> ``Tensor[n, m, H+h-1, W+w-1]``."""
    (H, W), (h, w) = grid, template
    return nn.functional.fold(prod, (H + h - 1, W + w - 1), (h, w))


def _slice_sum(prod: torch.Tensor, m: int, grid: tuple[int, int], template: tuple[int, int]) -> torch.Tensor:
    """As :func:`_fold_sum`, as ``h*w`` additions of whole shifted slices: on the CPU up to 2x
    faster than ``fold``'s per-element loop where each slice is large enough."""
    (H, W), (h, w) = grid, template
    cells = prod.view(prod.shape[0], m, h, w, H, W)
    sums = prod.new_zeros(prod.shape[0], m, H + h - 1, W + w - 1)
    for a in range(h):
        for b in range(w):
            sums[:, :, a : a + H, b : b + W] += cells[:, :, a, b]
    return sums


def _group_products(
    features: torch.Tensor, group: torch.Tensor, max_bytes: int = MAX_PRODUCT_BYTES, shifted_sum=_fold_sum
) -> torch.Tensor:
    """Cell products, then their shifted sum: ``Tensor[N, m, oh, ow]`` of sums (not means).

    Args:
        features (Tensor[N, C, H, W]): frame features.
        group (Tensor[m, C, h, w]): templates of one size.
        max_bytes: bound on the products (:func:`product_chunks`; the sums are the same).
        shifted_sum: :func:`_fold_sum` (method ``"fold"``) or :func:`_slice_sum` (``"slices"``).

    One GEMM of all template cells against all frame cells, ``[m*h*w, C] @ [C, H*W]`` per
    frame, gives ``P[N, m*h*w, H*W]``. Position ``p``'s score sums ``P[(k, u, v), p + (u, v)]``
    over template cells: with the cells flipped, that is exactly ``fold`` (col2im), which
    reads each product once. Cost: ``m*h*w*C`` multiply-adds per frame cell, and a product
    as large as the features times ``m*h*w / C``: the method for few templates per size.
    """
    n, c, H, W = features.shape
    m, _, h, w = group.shape
    oh, ow = map_shape((H, W), (h, w))
    r0, c0 = h - 1 - h // 2, w - 1 - w // 2  # the position with top-left (-(h//2), -(w//2))
    out = group.new_empty(n, m, oh, ow)
    pair_bytes = H * W * h * w * group.element_size()
    if features.device.type == "cpu":
        max_bytes = min(max_bytes, max(CPU_CHUNK_BYTES, CPU_CHUNK_PAIRS * pair_bytes))
    for fs, ts in product_chunks(n, m, pair_bytes, max_bytes):
        part = group[ts]
        cells = template_cells(part, flip=True)
        prod = _products(cells, features[fs])  # [n', m'*h*w, H*W]
        sums = shifted_sum(prod, len(part), (H, W), (h, w))  # [n', m', H+h-1, W+w-1]
        out[fs, ts] = sums[:, :, r0 : r0 + oh, c0 : c0 + ow]
    return out


def _products(cells: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``cells (Tensor[k, C]) @ features (Tensor[n, C, H, W])`` per frame: ``Tensor[n, k, H*W]``
    in the cells' dtype. Features of another dtype (half precision on the CPU) are converted
    :data:`CPU_CONVERT_BYTES` at a time, each chunk multiplied while still in cache."""
    n, c, H, W = features.shape
    if features.dtype == cells.dtype:
        return torch.matmul(cells, features.reshape(n, c, H * W))
    prod = cells.new_empty(n, cells.shape[0], H * W)
    step = _convert_frames(n, c * H * W * cells.element_size())
    chunk = _convert_buffer(step * c * H * W, cells.dtype, cells.device)
    for s in range(0, n, step):
        part = features[s : s + step].reshape(-1, c, H * W)
        torch.matmul(cells, chunk[: part.numel()].view(part.shape).copy_(part), out=prod[s : s + step])
    return prod


def _convert_frames(n: int, frame_bytes: int) -> int:
    """Frames converted and multiplied at a time, of ``n``: about :data:`CPU_CONVERT_BYTES`
    worth, the same number in each chunk, a multiple of torch's threads. With an odd
    number of frames to a chunk on the 2-core CPU (7, from 4 MiB of 112x30x40 frames), the
    one-query scan ran at 0.74-0.77x of the unchunked conversion; with 4, 6, 8 or 10 at
    1.30-1.38x (``epyc/scan-cpu-fused-convert-ab.txt``): MKL shares a batch of GEMMs out
    among its threads a whole GEMM each."""
    threads = max(1, torch.get_num_threads())
    chunks = -(-n // max(1, CPU_CONVERT_BYTES // frame_bytes))
    step = -(-n // chunks)
    return min(n, -(-step // threads) * threads)


_buffers = threading.local()


def _convert_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat tensor of at least ``numel`` elements, this thread's own, kept from call to
    call: one allocation a thread for the chunks' conversions, not one a chunk."""
    key = (dtype, device)
    have = getattr(_buffers, "by_kind", None)
    if have is None:
        have = _buffers.by_kind = {}
    if key not in have or have[key].numel() < numel:
        have[key] = torch.empty(numel, dtype=dtype, device=device)
    return have[key]


def _group_conv(features: torch.Tensor, group: torch.Tensor, max_bytes: int = MAX_PRODUCT_BYTES) -> torch.Tensor:
    """Direct convolution (oneDNN / cuDNN), same output as :func:`_group_products`. It holds
    no cell products (``max_bytes`` does not apply), and its cost per template falls as
    templates share the frames: the method for many templates of one size.

    The features go in as they come, padded by the convolution itself. A padded
    channels-last copy, which this method used to make, was slower on both machines
    measured: 0.71-0.87x of this on the 2-core CPU (``matcher-cpu-conv-layouts.txt``), and
    0.83-1.01x of plain fp16 conv2d with 64 templates of one size on an H200."""
    h, w = group.shape[2:]
    return nn.functional.conv2d(features.to(group.dtype), group, padding=(h // 2, w // 2))


_GROUP_METHODS = {
    "fold": functools.partial(_group_products, shifted_sum=_fold_sum),
    "slices": functools.partial(_group_products, shifted_sum=_slice_sum),
    "conv": _group_conv,
}


def _fastest(key: tuple, candidates: dict, args: tuple, warm_up: tuple):
    """Run the remembered pick for ``key``, or time every candidate on ``args`` (after a
    run on ``warm_up``, one frame: library set-up is not a method's cost), remember the
    fastest and its time, and return its result. ``args[0]`` is the features. Picks are
    also kept on disk for later processes (:mod:`dtm_ops.picks`). A candidate that cannot
    run here (:func:`cannot_run`: out of memory, no kernel) is logged and left out; where
    none can, the first one's error is raised."""
    if _known(key, candidates):
        return candidates[_picked[key]](*args)
    best, failed = None, None
    for name, fn in candidates.items():
        timed = _timed_here(name, key, fn, args, warm_up, SURE_SLOWER * best[0] if best else float("inf"))
        if isinstance(timed, Exception):
            failed = failed or timed
            continue
        took, out = timed
        if best is None or took < best[0]:
            best = (took, name, out)
    if best is None:
        raise failed
    _settle(key, best[1], best[0])
    return best[2]


def cannot_run(error: Exception) -> bool:
    """Whether ``error``, raised by a method while ``auto`` timed it, says that this device
    cannot run that method on these inputs (out of memory, no kernel for the dtype or
    layout, a library's refusal, a Triton kernel that does not compile for this GPU), so
    that the others are picked from instead. Errors of the call itself (``TypeError``,
    ``ValueError``, ...) are raised as they are."""
    return isinstance(error, (RuntimeError, NotImplementedError, MemoryError)) or type(error).__module__.startswith(
        "triton")


def _timed_here(name: str, key: tuple, fn, args: tuple, warm_up: tuple, give_up: float = float("inf")):
    """:func:`_timed`, or the error where this device cannot run method ``name``
    (:func:`cannot_run`), logged with the pick's ``key``; other errors are raised."""
    try:
        return _timed(fn, args, warm_up, give_up)
    except Exception as e:
        if not cannot_run(e):
            raise
        log.warning("auto: method %r cannot run for %s (%s: %s); picking among the others", name, key[:5],
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return e


def _known(key: tuple, methods) -> bool:
    """Whether ``key`` has a pick among ``methods``: made in this process, or kept on disk
    by an earlier one on this machine (:func:`dtm_ops.picks.recall`), which is then
    remembered here too. A kept pick this process does not have (Triton's ``"shift"``
    where Triton is missing) is timed anew."""
    if key in _picked:
        return True
    kept = picks.recall(key)
    if kept is None or kept[0] not in methods:
        return False
    _picked[key], _pick_times[key] = kept
    return True


def _settle(key: tuple, method: str, seconds: float) -> None:
    """Remember ``method`` for ``key``, here and on disk (:func:`dtm_ops.picks.remember`)."""
    _picked[key], _pick_times[key] = method, seconds
    picks.remember(key, method, seconds)


#: A candidate whose first timed run takes this many times the best one's time so far is
#: not run a second time: no noise seen on these machines (runs within 20% of each other)
#: would make it the fastest.
SURE_SLOWER = 2.0


def _timed(fn, args: tuple, warm_up: tuple, give_up: float = float("inf")) -> tuple[float, object]:
    """``(seconds, result)`` of ``fn(*args)``: the better of two runs (one run can be slowed
    by the machine's other work), after a run on ``warm_up``; one run only where it took
    more than ``give_up`` seconds."""
    fn(*warm_up)
    sync = torch.cuda.synchronize if args[0].is_cuda else (lambda: None)
    took = float("inf")
    for _ in range(2):
        sync()
        start = time.perf_counter()
        out = fn(*args)
        sync()
        took = min(took, time.perf_counter() - start)
        if took > give_up:
            break
    return took, out


class _OverBudget(Exception):
    """The size groups' picks have added up to more time than the spectral method takes."""


class _Budget:
    """Seconds the size groups of a set may take, in their picks' times, before they have
    lost to the spectral method (:func:`_pick_set`)."""

    def __init__(self, seconds: float) -> None:
        self.left = seconds

    def spend(self, seconds: float) -> None:
        self.left -= seconds
        if self.left < 0:
            raise _OverBudget


def _key(what: str, features: torch.Tensor, group: torch.Tensor) -> tuple:
    return (what, features.device.type, features.dtype, tuple(features.shape[1:]), tuple(group.shape),
            len(features).bit_length())


def _group_sums(features: torch.Tensor, group: torch.Tensor, method: str, max_bytes: int) -> torch.Tensor:
    if method != "auto":
        return _GROUP_METHODS[method](features, group, max_bytes)
    return _fastest(_key("maps", features, group), _GROUP_METHODS, (features, group, max_bytes),
                    (features[:1], group, max_bytes))


def _size_groups(
    features: torch.Tensor, templates: Sequence[torch.Tensor], valid: torch.Tensor | None
) -> tuple[torch.Tensor, list[tuple[tuple[int, int], list[int], torch.Tensor]]]:
    """``valid`` on the features' device (default: the full grid), and the templates by
    size: ``((h, w), indices, group Tensor[m, C, h, w] in compute_dtype(features))``."""
    valid = _valid(features, valid)
    by_size: dict[tuple[int, int], list[int]] = {}
    for k, t in enumerate(templates):
        by_size.setdefault((int(t.shape[1]), int(t.shape[2])), []).append(k)
    dtype = compute_dtype(features)
    groups = [(size, idx, torch.stack([templates[k] for k in idx]).to(dtype)) for size, idx in by_size.items()]
    return valid, groups


def compute_dtype(features: torch.Tensor) -> torch.dtype:
    """The dtype templates are matched in: the features' own, except float32 for float16
    or bfloat16 features on the CPU, which has no fast half-precision GEMM (about 20 times
    slower than float32 on the 2-core CPU, ``epyc/scan-cpu-fused-convert-ab.txt``). Those
    are converted a chunk of frames at a time as they are matched
    (:data:`CPU_CONVERT_BYTES`); the conversion is exact, so the maps are those of
    ``features.float()`` up to the order of float32 additions."""
    if features.device.type == "cpu" and features.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return features.dtype


def _valid(features: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """``valid Tensor[N, 2]`` on the features' device; default the full grid."""
    n, _, H, W = features.shape
    if valid is None:  # made on the device: a copy from the host would wait for the GPU's queued work
        valid = features.new_full((n, 2), H, dtype=torch.long)
        valid[:, 1] = W
    return valid.to(features.device)


def _keeps_picks(fn):
    """``fn``, writing the picks it made to disk as it returns (:func:`dtm_ops.picks.flush`)."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        finally:
            picks.flush()
    return call


@_keeps_picks
def patchwise_cosine(
    features: torch.Tensor,
    templates: Sequence[torch.Tensor],
    valid: torch.Tensor | None = None,
    *,
    max_bytes: int = MAX_PRODUCT_BYTES,
    method: str = "auto",
) -> list[torch.Tensor]:
    """Similarity maps of every template over every frame, in one pass over the features.

    Args:
        features (Tensor[N, C, H, W]): frame features, unit-norm per valid cell, zero on padding.
        templates (list of Tensor[C, h_k, w_k]): unit-norm per cell; sizes may differ.
        valid (Tensor[N, 2], optional): valid ``(rows, cols)`` per frame; default the full grid.
        max_bytes: bound on the intermediate products (see :data:`MAX_PRODUCT_BYTES`).
        method: ``"fold"`` (one GEMM of frame cells against template cells, then their
            shifted sum by ``fold``), ``"slices"`` (the same GEMM, then the shifted sum as
            slice additions), ``"conv"`` (direct convolution), or ``"auto"``: per group of
            same-size templates, the fastest on this machine, timed on first use. All give
            the same maps.

    Returns:
        list of Tensor[N, oh_k, ow_k] (float32): one map per template, see :func:`map_shape`.

    Templates of one size are matched together. On CUDA, fp16 inputs multiply in fp16
    with fp32 accumulation; the sums over template cells are fp16 and the means fp32 (the
    error stays within fp16 tolerance of the reference). On the CPU, fp16 features are
    matched in float32 (:func:`compute_dtype`), as ``features.float()`` would be. When the
    products of ``"fold"`` or ``"slices"`` would exceed ``max_bytes`` (many queries, large
    scales), templates and frames go in chunks (:func:`product_chunks`): the maps are the
    same.
    """
    _check(features, templates, valid)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    n, c, H, W = features.shape
    if not templates:
        return []
    valid, groups = _size_groups(features, templates, valid)
    maps: list[torch.Tensor | None] = [None] * len(templates)
    for (h, w), idx, group in groups:
        s = _group_sums(features, group, method, max_bytes).float()  # not shared: changed in place
        s.div_(h * w).masked_fill_(~position_mask(valid, (H, W), (h, w))[:, None], float("-inf"))
        for j, k in enumerate(idx):
            maps[k] = s[:, j]
    return maps  # type: ignore[return-value]


@_keeps_picks
def best_matches(
    features: torch.Tensor,
    templates: Sequence[torch.Tensor],
    valid: torch.Tensor | None = None,
    *,
    max_bytes: int = MAX_PRODUCT_BYTES,
    method: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best position of every template in every frame: what the scan needs, without maps.

    Args: as :func:`patchwise_cosine`; ``method`` may also be ``"shift"`` (CUDA with
        Triton: :mod:`dtm_ops.shiftmax`, products summed and reduced in one kernel, no map
        in GPU memory) or ``"fft"`` (:mod:`dtm_ops.spectral`: all templates at once through
        the frames' spectra, whose cost grows with the number of templates but not their
        size). ``"auto"`` times the methods this device has per size group, and where
        :func:`dtm_ops.spectral.weighed` says so (its arithmetic the smaller: many
        templates, large ones), times the spectral method against the best per group for
        the whole set of templates, once per set of template sizes, picking groups only
        while they can still win (:func:`_pick_set`).

    Returns:
        ``(score, row, col)``, each ``Tensor[T, N]``: as :func:`best_positions` of each
        template's map (``-inf`` where no position obeys the border rule).
    """
    from dtm_ops import spectral

    _check(features, templates, valid)
    n, c, H, W = features.shape
    if not templates or method not in ("auto", "fft"):
        return _best_by_groups(features, templates, valid, max_bytes, method)
    valid = _valid(features, valid)
    sizes = spectral.sizes_of(templates)
    if method == "fft":
        return spectral.best_matches(features, templates, valid, max_bytes)
    if not spectral.weighed(features.dtype, (H, W), c, sizes, features.device.type):
        return _best_by_groups(features, templates, valid, max_bytes, method)
    key = ("best-set", features.device.type, features.dtype, (c, H, W), _set_sizes(sizes), n.bit_length())
    if not _known(key, ("fft", "groups")):
        return _pick_set(key, features, templates, valid, max_bytes)
    if _picked[key] == "fft":
        return spectral.best_matches(features, templates, valid, max_bytes)
    return _best_by_groups(features, templates, valid, max_bytes, "auto")


def _pick_set(
    key: tuple, features: torch.Tensor, templates: Sequence[torch.Tensor], valid: torch.Tensor, max_bytes: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``auto``'s pick for a whole set of templates, the spectral method (``"fft"``) or the
    size groups (``"groups"``), remembered under ``key``; returns the winner's result.

    The spectral method is timed first. Then each size group is picked in turn
    (:func:`_fastest`: every method timed on the batch), and the times of the groups'
    picks add up: the groups' time can be no less than that sum, so once it passes the
    spectral method's time they have lost, and the rest are neither picked nor timed.
    With many sizes, as a day's queries have (each its own ROI shape), picking every group
    took most of a first call: for 16 queries x 9 scales of mixed shapes (83 sizes) on 32
    frames on a 2-core CPU, 14 s, against 1.1 s for the groups once picked and 0.12 s for
    the spectral method; the first call now takes 1.7 s (18 s before), with the same pick."""
    from dtm_ops import spectral

    timed = _timed_here("fft", key, lambda f, v: spectral.best_matches(f, templates, v, max_bytes),
                        (features, valid), (features[:1], valid[:1]))
    if isinstance(timed, Exception):
        start = time.perf_counter()
        groups = _best_by_groups(features, templates, valid, max_bytes, "auto")
        _settle(key, "groups", time.perf_counter() - start)
        return groups
    took, out = timed
    budget = _Budget(took)
    try:
        groups = _best_by_groups(features, templates, valid, max_bytes, "auto", budget)
    except _OverBudget:
        groups = None
    _settle(key, "fft" if groups is None else "groups", took if groups is None else took - budget.left)
    return out if groups is None else groups


def _set_sizes(sizes: Sequence[tuple[int, int]]) -> tuple:
    """A template set's part of its pick's key: its distinct sizes and how many templates."""
    return tuple(sorted(set(sizes))), len(sizes)


def set_picks(templates: Sequence[torch.Tensor]) -> set[str]:
    """What ``auto`` picked for whole sets of templates of these sizes and channels (``"fft"``
    or ``"groups"``), on any device, grid and batch size: for benchmarks to report. Empty
    where the spectral method was not weighed."""
    from dtm_ops import spectral

    sig = _set_sizes(spectral.sizes_of(templates))
    c = templates[0].shape[0] if templates else None
    return {v for k, v in _picked.items() if k[0] == "best-set" and k[3][0] == c and k[4] == sig}


def group_picks(templates: Sequence[torch.Tensor], frames: int | None = None) -> dict[tuple[int, int], set[str]]:
    """What ``auto`` picked for each size group of these templates (as many templates of
    that size and channels) in :func:`best_matches`, on any device and grid, for batches of
    ``frames`` (any, by default): ``{(h, w): {method, ...}}``, for benchmarks to report."""
    counts: dict[tuple[int, ...], int] = {}
    for t in templates:
        counts[tuple(t.shape)] = counts.get(tuple(t.shape), 0) + 1
    out: dict[tuple[int, int], set[str]] = {}
    for k, v in _picked.items():
        m, c, h, w = k[4] if k[0] == "best" else (0, 0, 0, 0)
        if m and counts.get((c, h, w)) == m and (frames is None or k[5] == frames.bit_length()):
            out.setdefault((h, w), set()).add(v)
    return out


def _best_by_groups(
    features: torch.Tensor,
    templates: Sequence[torch.Tensor],
    valid: torch.Tensor | None,
    max_bytes: int,
    method: str,
    budget: _Budget | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`best_matches` one size group at a time (every method but ``"fft"``). With a
    ``budget`` (``auto`` only), each group's time is spent from it as it goes (the time its
    pick was timed at, or the call's own where the pick has none), raising
    :class:`_OverBudget` once it runs out."""
    from dtm_ops import shiftmax

    n, _, H, W = features.shape
    valid, groups = _size_groups(features, templates, valid)

    def via_sums(name):
        def run(f, g, v, mb):
            h, w = g.shape[2:]
            ok = position_mask(v, (H, W), (h, w))[:, None]
            best, at = _GROUP_METHODS[name](f, g, mb).masked_fill(~ok, float("-inf")).flatten(2).max(dim=2)
            return best.float() / (h * w), at
        return run

    candidates = {name: via_sums(name) for name in _GROUP_METHODS}
    if shiftmax.available(features.device):
        candidates["shift"] = shiftmax.group_best
    if method not in ("auto", *candidates):
        need = " (it needs CUDA and Triton)" if method == "shift" else ""
        raise ValueError(f"method must be one of {('auto', *candidates, 'fft')} here, got {method!r}{need}")
    score = features.new_empty(len(templates), n, dtype=torch.float32)
    rows = features.new_empty(len(templates), n, dtype=torch.long)
    cols = torch.empty_like(rows)
    for (h, w), idx, group in groups:
        args = (features, group, valid, max_bytes)
        if method == "auto":
            warm_up = (features[:1], group, valid[:1], max_bytes)
            key = _key("best", features, group)
            start = time.perf_counter()
            best, at = _fastest(key, candidates, args, warm_up)
            if budget is not None:
                if features.is_cuda:
                    torch.cuda.synchronize()
                budget.spend(_pick_times.get(key, time.perf_counter() - start))
        else:
            best, at = candidates[method](*args)
        ow = map_shape((H, W), (h, w))[1]
        sel = _rows(idx, features.device)
        score[sel], rows[sel], cols[sel] = best.T, (at // ow).T, (at % ow).T
    return score, rows, cols


_ROW_INDEX: dict[tuple, torch.Tensor] = {}


def _rows(idx: list[int], device: torch.device) -> slice | torch.Tensor:
    """Index of a size group's rows in the results: a slice where ``idx`` is evenly spaced
    (one template; or one scale of queries that each have the same scales), else an index
    tensor made once per device. A copy from the host on every call would wait for the GPU's
    queued work, and cannot be part of a CUDA graph (:mod:`dtm_ops.cudagraphs`)."""
    step = idx[1] - idx[0] if len(idx) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:])):
        return slice(idx[0], idx[-1] + 1, step)
    key = (tuple(idx), device)
    if key not in _ROW_INDEX:
        if len(_ROW_INDEX) >= 1024:
            _ROW_INDEX.clear()
        _ROW_INDEX[key] = torch.tensor(idx, device=device)
    return _ROW_INDEX[key]


def best_positions(smap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best position per frame of ``smap (Tensor[N, oh, ow])``.

    Returns ``(score, row, col)``, each ``Tensor[N]``; row/col are map indices. Ties go to
    the first position in row-major order. A frame with no valid position scores ``-inf``.
    """
    n = smap.shape[0]
    flat = smap.reshape(n, -1)
    if flat.shape[1] == 0:
        empty = torch.zeros(n, dtype=torch.long, device=smap.device)
        return torch.full((n,), float("-inf"), device=smap.device), empty, empty
    score, idx = flat.max(dim=1)
    return score, idx // smap.shape[2], idx % smap.shape[2]


class PatchwiseCosine(nn.Module):
    """Module form of :func:`patchwise_cosine` holding a fixed list of templates."""

    def __init__(self, templates: Sequence[torch.Tensor]) -> None:
        super().__init__()
        for k, t in enumerate(templates):
            self.register_buffer(f"t{k}", t)
        self.count = len(templates)

    def forward(self, features: torch.Tensor, valid: torch.Tensor | None = None) -> list[torch.Tensor]:
        return patchwise_cosine(features, [getattr(self, f"t{k}") for k in range(self.count)], valid)
