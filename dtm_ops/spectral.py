"""Patchwise cosine sums through the discrete Fourier transform: the method for many templates.

Correlating a frame with a template is a product of their spectra. With the frame's
features ``F (Tensor[C, H, W])`` and a template ``T (Tensor[C, h, w])`` zero-padded to
``P x Q``, the sums of every position are::

    S = IDFT( sum_c DFT(F[c]) * conj(DFT(T[c])) )

The frame's transform is made once and serves every template: a template then costs
``C`` complex multiply-adds per frequency and one inverse transform of its channel sum,
whatever its size, where the direct methods (:mod:`dtm_ops.matching`) cost ``h*w*C``
multiply-adds per frame cell. So this is the method for many queries and scales: a
day's queries over 9 scales each (:func:`estimated_macs` against
:func:`direct_macs`); for one small template the direct methods are cheaper.

No wrap-around: the template is placed so that map index ``(a, b)`` (top-left
``(a - h // 2, b - w // 2)``, as in :func:`dtm_ops.matching.map_shape`) comes out at
``(a, b)``; with ``P >= H + hmax // 2`` and ``Q >= W + wmax // 2`` the circular correlation
of a position never reaches frame cells from the other side. Cells off the frame count 0,
as in the direct methods (features are zero on padding).

The transforms are products with DFT matrices (real GEMMs, each direction in turn, laid
out so that the per-frequency products are batched matrix products): the same numbers as
``torch.fft`` (tested), and on the 2-core CPU several times faster than
``torch.fft.rfft2`` and the transpose its output needs, for these sizes (one-off timings
for 32 frames of 112x30x40 cells: about 7 ms, against 22-31 ms for ``rfft2`` alone):
each transform is one large GEMM, and the layout changes come with them.

Precision (:func:`transform_dtype`): everything in fp32, except for fp16 features on CUDA
(a GPU scan's): there the forward transforms, most of the method's arithmetic for a few
dozen templates, are fp16 GEMMs (tensor cores, fp32 accumulation), and their fp16 spectra
meet the templates' in products that accumulate and come out in fp32 (fp16 sums over
channels would overflow: hundreds of channels times spectra in the hundreds). Emulated on
the CPU for C=256 on a 68x120 grid, 8 templates of 7x12 and 4 of 17x30 cut from the
frames, the scores were within 5.2e-5 of the fp64 direct method, at the same positions.
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from dtm_ops import allocator

#: Template spectra kept for template lists seen recently (a scan passes the same list
#: with every batch); each holds ``P*(Q//2+1) * C * 2T`` numbers, ``3T`` in the
#: three-product form (:func:`spectra_bytes`).
SPECTRA_CACHE = 2
#: On the CPU, frames per pass at most, where freed memory goes back to the kernel: larger
#: passes ran slower on the first 2-core machine measured (for 32 and 64 frames of
#: 112x30x40, 0.3-0.9x of 16 over four template sets, 8 and 4 also slower), their
#: intermediates being fresh memory of tens to hundreds of MB, faulted in on every call.
CPU_CHUNK_FRAMES = 16
#: The same where the process keeps freed memory (:mod:`dtm_ops.allocator`, as a CPU scan
#: does): each template spectrum then serves more frames per pass for no page faults. On an
#: AMD EPYC (2 cores), in calls of the scan's 32 frames, side by side (``bench_matcher.py
#: --chunks``, three runs, ``benchmarks/results/speed/epyc/matcher-cpu-spectral-chunks.txt``):
#: 1.04-1.13x of 16 for 9 to 144 templates, 0.97-1.02x for 576; with freed memory returned,
#: 0.58-1.12x.
CPU_CHUNK_FRAMES_KEPT = 32
#: ``auto`` weighs the method only where the templates' spectra fit in this many bytes (an
#: explicit ``method="fft"`` is not bound by it): hundreds of templates at 1024 channels
#: would otherwise fill a small GPU's memory just to be timed.
SPECTRA_MAX_BYTES = 2 << 30
#: From this many templates on, fp32 channel sums take three real products per frequency
#: instead of four (:func:`channel_sums`). On the 2-core CPU, side by side on 32 frames of
#: 112x30x40 (``bench_matcher.py --forms``, ``matcher-cpu-spectral-forms.txt``), three took
#: 0.88-0.97x of four's time for 36-144 templates and 0.70x for 288, but 1.08-1.13x for 9
#: and 16.
THREE_PRODUCTS_MIN = 32

#: Bytes of float32 spectra :func:`template_spectra` makes at a time before it stores them
#: as ``[c | d]`` (in the forward dtype): the rows of frequencies of a block.
SPECTRA_BLOCK_BYTES = 64 << 20

_spectra: OrderedDict[tuple, tuple[list[weakref.ref], tuple[int, ...], torch.Tensor, int]] = OrderedDict()
_tokens = itertools.count()


def fft_length(n: int) -> int:
    """Smallest ``2^a * 3^b * 5^c >= n``: a length the transforms handle well."""
    n = max(1, n)
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


@dataclass(frozen=True)
class Plan:
    """Transform sizes and DFT matrices for a frame grid and a set of template sizes.

    Attributes:
        grid: the frames' ``(H, W)``.
        P, Q: padded transform size; frequencies ``K = P * (Q // 2 + 1)`` (real input).
        hout, wout: the largest map among the templates (:func:`dtm_ops.matching.map_shape`).
        dw (Tensor[2*Qh, W]): forward along rows of cells: ``[cos; -sin]``.
        eh (Tensor[2P, 2H]): forward along columns, complex as real blocks; rows in
            ``(re/im, frequency)`` order, columns in ``(row, re/im)`` order.
        ih (Tensor[2*hout, 2P]): inverse along columns, complex as real blocks (``(cos + i
            sin) / P``), the map's rows only; rows in ``(row, re/im)`` order, columns in
            ``(re/im, frequency)`` order.
        iw (Tensor[wout, 2*Qh]): inverse along rows to real values (Hermitian weights,
            ``/ Q``), columns in ``(re/im, frequency)`` order.

    ``dw`` and ``eh`` are in the forward transforms' dtype (:func:`transform_dtype`), which
    the frame and template spectra then have; ``ih`` and ``iw`` are float32.
    """

    grid: tuple[int, int]
    P: int
    Q: int
    hout: int
    wout: int
    dw: torch.Tensor
    eh: torch.Tensor
    ih: torch.Tensor
    iw: torch.Tensor

    @property
    def qh(self) -> int:
        return self.Q // 2 + 1

    @property
    def frequencies(self) -> int:
        return self.P * self.qh


def _angles(rows: int, cols: int, n: int, shift: int = 0) -> torch.Tensor:
    """``Tensor[rows, cols]`` float64: ``2 pi * r * (c - shift) / n``, reduced mod ``n``
    first (exact)."""
    r = torch.arange(rows, dtype=torch.int64)[:, None]
    c = torch.arange(cols, dtype=torch.int64)[None] - shift
    return (r * c % n).double() * (2 * math.pi / n)


def sizes_of(templates: Sequence[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    return tuple((int(t.shape[1]), int(t.shape[2])) for t in templates)


def padded(grid: tuple[int, int], sizes: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """``(P, Q)``: the transform size, ``P >= H + hmax // 2`` and ``Q >= W + wmax // 2``."""
    return (fft_length(grid[0] + max(h for h, _ in sizes) // 2),
            fft_length(grid[1] + max(w for _, w in sizes) // 2))


def transform_dtype(features: torch.Tensor) -> torch.dtype:
    """The forward transforms' dtype for these features: float16 for fp16 features on CUDA
    (tensor cores), else float32. The products and the inverse are float32 always."""
    return _transform_dtype(features.dtype, features.device.type)


def _transform_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    return torch.float16 if dtype == torch.float16 and device_type == "cuda" else torch.float32


def plan_for(features: torch.Tensor, templates: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> Plan:
    """The :func:`plan` of these frames (``Tensor[n, C, H, W]``) and templates; forward
    transforms in ``dtype`` (default :func:`transform_dtype`)."""
    sizes = tuple(sorted(set(sizes_of(templates))))
    return plan(tuple(features.shape[2:]), sizes, features.device, dtype or transform_dtype(features))


@functools.lru_cache(maxsize=32)
def plan(
    grid: tuple[int, int], sizes: tuple[tuple[int, int], ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> Plan:
    """The :class:`Plan` for frames of ``grid`` and templates of ``sizes`` (``(h, w)`` each),
    forward transforms in ``dtype``."""
    from dtm_ops.matching import map_shape

    H, W = grid
    P, Q = padded(grid, sizes)
    hout = max(map_shape(grid, s)[0] for s in sizes)
    wout = max(map_shape(grid, s)[1] for s in sizes)
    qh = Q // 2 + 1
    a = _angles(qh, W, Q)  # [Qh, W]
    dw = torch.cat([a.cos(), -a.sin()], 0)
    a = _angles(P, H, P)  # [P, H]: (re + i im) * (cos - i sin)
    eh = torch.stack([torch.cat([a.cos(), -a.sin()], 0), torch.cat([a.sin(), a.cos()], 0)], 2).view(2 * P, 2 * H)
    a = _angles(hout, P, P)  # [hout, P]: (cos + i sin) (re + i im)
    ih = torch.stack([torch.cat([a.cos(), -a.sin()], 1), torch.cat([a.sin(), a.cos()], 1)], 1).view(2 * hout, 2 * P) / P
    weight = torch.full((qh, 1), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if Q % 2 == 0:
        weight[-1] = 1.0  # the Nyquist column stands for itself
    a = _angles(qh, wout, Q)  # [Qh, wout]
    iw = (torch.cat([a.cos() * weight, -a.sin() * weight], 0) / Q).T.contiguous()
    return Plan(grid, P, Q, hout, wout, dw.to(device, dtype), eh.to(device, dtype),
                ih.to(device, torch.float32), iw.to(device, torch.float32))


def three_products(templates: int, dtype: torch.dtype) -> bool:
    """Whether :func:`channel_sums` takes three real products (Gauss) for this many
    templates with spectra in ``dtype`` (a plan's forward dtype): in fp32, from
    :data:`THREE_PRODUCTS_MIN` on. In fp16 on CUDA the method is bound by memory, and the
    extra pass over the frame spectra (``a + b``) would cost more than the products it
    saves."""
    return dtype == torch.float32 and templates >= THREE_PRODUCTS_MIN


def template_spectra(templates: Sequence[torch.Tensor], p: Plan) -> torch.Tensor:
    """The conjugate spectra ``c + id`` of the templates, as :func:`channel_sums` takes
    them: ``Tensor[K, C, 2T]``, ``[c | d]``, or where :func:`three_products`,
    ``Tensor[3, K, C, T]``, ``(c, d - c, c + d)``. Computed in fp32, stored in the plan's
    forward dtype.

    Args:
        templates (list of Tensor[C, h_t, w_t]): unit-norm per cell.

    Each template's spectrum is that of the template zero-padded to ``P x Q`` with its cell
    ``(h // 2, w // 2)`` at the origin, so that the inverse transform puts map index
    ``(a, b)`` at ``(a, b)``. It is computed as the DFT of the cells alone: the templates
    are placed side by side (innermost) on one small canvas with their ``(h // 2, w // 2)``
    cells on a common cell ``(r0, c0)``, then two GEMMs (each canvas row's DFT with the
    origin at ``c0``, then each column's at ``r0``, the stored forms folded into its
    matrix) give every spectrum in the stored layout: the three-product form written in
    place, ``[c | d]`` a block of frequency rows at a time (:data:`SPECTRA_BLOCK_BYTES`).
    A padded ``rfft2`` per template transformed mostly zeros and wrote its spectrum one
    strided column at a time: for 144 templates of 112 channels on a 30x40 grid, 0.41-0.45 s
    of a fresh scan task's first call on the 2-core CPU, 0.19-0.22 s now
    (``benchmarks/results/speed/epyc/template-spectra-ab.txt``).
    """
    c = templates[0].shape[0]
    T = len(templates)
    device = templates[0].device
    sizes = sizes_of(templates)
    r0, c0 = max(h // 2 for h, _ in sizes), max(w // 2 for _, w in sizes)
    hc, wc = r0 + max(h - h // 2 for h, _ in sizes), c0 + max(w - w // 2 for _, w in sizes)
    canvas = torch.zeros(hc, wc, c, T, device=device)
    for k, (t, (h, w)) in enumerate(zip(templates, sizes)):
        canvas[r0 - h // 2:r0 - h // 2 + h, c0 - w // 2:c0 - w // 2 + w, :, k] = t.permute(1, 2, 0)
    a = _angles(p.qh, wc, p.Q, c0)  # [Qh, wc]
    along_rows = torch.cat([a.cos(), -a.sin()], 0).to(device, torch.float32)  # re, im of e^(-i angle)
    y = torch.matmul(along_rows, canvas.view(hc, wc, c * T)).view(2 * hc, p.qh * c * T)  # [(row, re/im), (Qh, C, T)]
    del canvas
    a = _angles(p.P, hc, p.P, r0)  # [P, hc]: (cos - i sin) (re + i im), conjugated
    re = torch.stack([a.cos(), a.sin()], 2).view(p.P, 2 * hc)  # c
    im = torch.stack([a.sin(), -a.cos()], 2).view(p.P, 2 * hc)  # d
    if three_products(T, p.dw.dtype):  # fp32: the GEMM writes the stored form in place
        out = torch.empty(3, p.frequencies, c, T, device=device)
        torch.matmul(torch.cat([re, im - re, re + im]).to(device, torch.float32), y, out=out.view(3 * p.P, -1))
        return out
    out = torch.empty(p.frequencies, c, 2 * T, device=device, dtype=p.dw.dtype)
    forms = torch.stack([re, im]).to(device, torch.float32)  # [2, P, 2hc]
    step = max(1, SPECTRA_BLOCK_BYTES // (2 * p.qh * c * T * 4))
    for k0 in range(0, p.P, step):  # blocks of frequency rows: no more than the stored spectra at once
        z = (forms[:, k0:k0 + step] @ y).view(2, -1, c, T)
        ks = slice(k0 * p.qh, k0 * p.qh + z.shape[1])
        out[ks, :, :T], out[ks, :, T:] = z
    return out


def cached_spectra(templates: Sequence[torch.Tensor], p: Plan) -> torch.Tensor:
    """:func:`template_spectra`, kept while the same template tensors live (at most
    :data:`SPECTRA_CACHE` lists: a scan passes the same list with every batch).

    A list is known again when it holds the same tensor objects, unchanged since (their
    version counters). The cache refers to them weakly: when one is freed its entry goes,
    so a finished scan leaves no spectra in (GPU) memory, and a new tensor at a freed
    one's address is never taken for it."""
    key = (tuple(id(t) for t in templates), p.grid, p.P, p.Q, templates[0].device, p.dw.dtype,
           three_products(len(templates), p.dw.dtype))
    versions = tuple(t._version for t in templates)
    hit = _spectra.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], templates)) and hit[1] == versions:
        _spectra.move_to_end(key)
        return hit[2]
    spectra = template_spectra(templates, p)
    token = next(_tokens)
    _spectra[key] = ([weakref.ref(t) for t in templates], versions, spectra, token)
    for t in {id(t): t for t in templates}.values():
        weakref.finalize(t, _forget, key, token)  # the token, not the spectra: nothing kept alive
    while len(_spectra) > SPECTRA_CACHE:
        _spectra.popitem(last=False)
    return spectra


def _forget(key: tuple, token: int) -> None:
    """A template of ``key``'s entry was freed: drop the entry, if it is still that one."""
    hit = _spectra.get(key)
    if hit is not None and hit[3] == token:
        del _spectra[key]


def spectra_bytes(
    grid: tuple[int, int], channels: int, sizes: Sequence[tuple[int, int]], dtype: torch.dtype = torch.float32
) -> int:
    """Bytes of the template spectra (:func:`template_spectra`) for these template sizes,
    kept in ``dtype`` (the forward transforms' dtype, :func:`transform_dtype`): ``2T``
    columns, ``3T`` in the three-product form (:func:`three_products`)."""
    P, Q = padded(grid, sizes)
    T = len(sizes)
    columns = 3 * T if three_products(T, dtype) else 2 * T
    return P * (Q // 2 + 1) * channels * columns * torch.finfo(dtype).bits // 8


def frame_spectra(features: torch.Tensor, p: Plan) -> torch.Tensor:
    """``features (Tensor[n, C, H, W])`` -> ``Tensor[n, 2, K, C]``: real and imaginary parts
    of each channel's 2-D spectrum, channels innermost (ready for per-frequency products),
    computed and returned in the plan's forward dtype.

    The cells go channels-last first (one copy, fast), so that each transform is a batched
    GEMM whose output is already in the next one's layout; transposing the transform's
    output instead (channels from stride ``H*W`` to 1) took 20 of 30 ms for 32 frames of
    112x30x40 on the 2-core CPU."""
    n, c, H, W = features.shape
    cells = features.to(p.dw.dtype).permute(0, 2, 3, 1).contiguous()  # [n, H, W, C]
    b = torch.matmul(p.dw, cells.view(n * H, W, c))  # along rows: [n, H, (re/im, Qh), C]
    return torch.matmul(p.eh, b.view(n, H * 2, p.qh * c)).view(n, 2, p.frequencies, c)  # along columns


def channel_sums(x: torch.Tensor, spectra: torch.Tensor) -> torch.Tensor:
    """Per frequency, the sum over channels of frame spectrum times template spectrum.

    Args:
        x (Tensor[n, 2, K, C]): :func:`frame_spectra`, ``a + ib``.
        spectra (Tensor[K, C, 2T] or Tensor[3, K, C, T]): :func:`template_spectra` of
            ``c + id``, of ``x``'s dtype.

    Returns:
        Tensor[2, K, n, T] float32: real and imaginary parts.

    Four real products, ``a [c | d]`` and ``b [c | d]``; or, with the three-product
    operands, three (Gauss): ``k1 = (a + b) c``, ``k2 = a (d - c)``, ``k3 = b (c + d)``, real
    part ``k1 - k3``, imaginary ``k1 + k2``, for a pass over the frame spectra more.
    """
    a = x[:, 0].transpose(0, 1)  # [K, n, C]
    b = x[:, 1].transpose(0, 1)
    K, n = a.shape[:2]
    T = spectra.shape[3] if spectra.ndim == 4 else spectra.shape[2] // 2
    y = torch.empty(2, K, n, T, device=x.device)
    if spectra.ndim == 4:
        k1 = _bmm_float32((x[:, 0] + x[:, 1]).transpose(0, 1), spectra[0])  # [K, n, T]
        torch.sub(k1, _bmm_float32(b, spectra[2]), out=y[0])
        torch.add(k1, _bmm_float32(a, spectra[1]), out=y[1])
        return y
    u = _bmm_float32(a, spectra)  # [K, n, 2T]: (ac | ad)
    v = _bmm_float32(b, spectra)  # (bc | bd)
    torch.sub(u[:, :, :T], v[:, :, T:], out=y[0])
    torch.add(u[:, :, T:], v[:, :, :T], out=y[1])
    return y


@functools.lru_cache(maxsize=None)
def _has_out_dtype(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs for ``dtype`` inputs on this
    device (torch >= 2.8 on CUDA; this CPU build has no such kernel), tried once on 1x1
    matrices: the answer is the library's, so that an error of a real call is never taken
    for it and hidden."""
    one = torch.ones(1, 1, 1, dtype=dtype, device=device)
    try:
        torch.bmm(one, one, out_dtype=torch.float32)
    except (TypeError, NotImplementedError, RuntimeError):  # no such argument, or no kernel for it
        return False
    return True


def _bmm_float32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` in float32: fp16 inputs multiply as they are, accumulate and come
    out in fp32, in one GEMM where torch has one (``out_dtype``, CUDA), else from fp32
    copies of the inputs (the same numbers, more memory traffic)."""
    if a.dtype == torch.float32:
        return torch.bmm(a, b)
    if _has_out_dtype(a.device, a.dtype):
        return torch.bmm(a, b, out_dtype=torch.float32)
    return torch.bmm(a.float(), b.float())


def inverse(y: torch.Tensor, p: Plan) -> torch.Tensor:
    """``y (Tensor[2, K, n, T])`` -> ``Tensor[hout, wout, n, T]``: the real sums at the map
    positions (rows and columns beyond a template's own map are to be cropped).

    Two GEMMs, each writing the next one's operand in place: along columns, the complex
    product as real blocks, out in ``(row, re/im, frequency)`` order; then along rows, a
    batched GEMM per map row. Combining the real and imaginary parts in a pass of their
    own and transposing them for the second GEMM took a third of the inverse's time
    (``benchmarks/results/speed/epyc/spectral-inverse-ab.txt``)."""
    _, _, n, T = y.shape
    g = (p.ih @ y.view(2 * p.P, p.qh * n * T)).view(p.hout, 2 * p.qh, n * T)  # along columns
    return torch.matmul(p.iw, g).view(p.hout, p.wout, n, T)  # along rows, real


def sums(features: torch.Tensor, templates: Sequence[torch.Tensor], p: Plan | None = None) -> torch.Tensor:
    """Sums (not means) of cell cosines at every map position, without the border rule.

    Args:
        features (Tensor[n, C, H, W]): frame features.
        templates (list of Tensor[C, h_t, w_t]).

    Returns:
        Tensor[hout, n, T, wout] (float32, a view): template ``t``'s map is
        ``[:oh_t, :, t, :ow_t]``.
    """
    if p is None:
        p = plan_for(features, templates)
    return inverse(channel_sums(frame_spectra(features, p), cached_spectra(templates, p)), p).permute(0, 2, 3, 1)


def frame_bytes(p: Plan, channels: int, templates: int) -> int:
    """Bytes of the intermediates per frame, for chunking a batch: the forward transforms'
    in their dtype (and ``a + b`` of three products), the rest in fp32 (the channel sums,
    the inverse's half-way result, and the sums, whose positions that break the border
    rule are set to ``-inf`` in place), and the border rule's mask and its negation (bool)."""
    H, _ = p.grid
    T = templates
    forward = 2 * channels * H * 2 * p.qh + 3 * p.frequencies * channels
    rest = 6 * p.frequencies * T + 2 * p.hout * p.qh * T + p.hout * T * p.wout
    return forward * p.dw.element_size() + 4 * rest + 2 * p.hout * T * p.wout


def cpu_chunk_frames() -> int:
    """Frames per pass on the CPU at most: :data:`CPU_CHUNK_FRAMES_KEPT` where this process
    keeps freed memory (:func:`dtm_ops.allocator.kept`), else :data:`CPU_CHUNK_FRAMES`."""
    return CPU_CHUNK_FRAMES_KEPT if allocator.kept() else CPU_CHUNK_FRAMES


def estimated_macs(grid: tuple[int, int], channels: int, sizes: Sequence[tuple[int, int]]) -> int:
    """Multiply-adds per frame of this method: transforms, products (four real ones per
    frequency; fewer in the three-product form), inverse transforms."""
    H, W = grid
    P, Q = padded(grid, sizes)
    qh, T = Q // 2 + 1, len(sizes)
    hout, wout = H + 1, W + 1
    return (channels * H * W * 2 * qh + 4 * P * H * qh * channels + 2 * P * qh * channels * 2 * T
            + 2 * hout * P * qh * 2 * T + hout * T * 2 * qh * wout)


def weighed(
    dtype: torch.dtype, grid: tuple[int, int], channels: int, sizes: Sequence[tuple[int, int]], device_type: str
) -> bool:
    """Whether ``auto`` (:func:`dtm_ops.matching.best_matches`) times this method for a set
    of templates, features of ``dtype`` on a ``device_type`` device: its multiply-adds are
    fewer than the direct methods', the spectra fit in :data:`SPECTRA_MAX_BYTES`, and the
    features are not float64 (it computes in fp32; a caller passing float64 asked for
    more)."""
    kept = _transform_dtype(dtype, device_type)
    return (dtype != torch.float64
            and estimated_macs(grid, channels, sizes) < direct_macs(grid, channels, sizes)
            and spectra_bytes(grid, channels, sizes, kept) <= SPECTRA_MAX_BYTES)


def direct_macs(grid: tuple[int, int], channels: int, sizes: Sequence[tuple[int, int]]) -> int:
    """Multiply-adds per frame of the direct methods' products: every template cell against
    every frame cell."""
    return grid[0] * grid[1] * channels * sum(h * w for h, w in sizes)


def best_matches(
    features: torch.Tensor,
    templates: Sequence[torch.Tensor],
    valid: torch.Tensor,
    max_bytes: int,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`dtm_ops.matching.best_matches` by this method (its ``method="fft"``).

    Args:
        features (Tensor[n, C, H, W]): unit-norm per valid cell, zero on padding.
        templates (list of Tensor[C, h_t, w_t]), at least one.
        valid (Tensor[n, 2]): valid ``(rows, cols)`` per frame, on the features' device.
        max_bytes: bound on the intermediates of one pass; frames go in chunks within it.
        dtype: the forward transforms' dtype; default :func:`transform_dtype` (fp16 only for
            fp16 features on CUDA).

    Returns:
        ``(score, row, col)``, each ``Tensor[T, n]``.
    """
    from dtm_ops.matching import position_masks

    n, c = features.shape[:2]
    T = len(templates)
    p = plan_for(features, templates, dtype)
    spectra = cached_spectra(templates, p)
    sizes, cells = _size_tensors(sizes_of(templates), features.device)
    ok_rows, ok_cols = position_masks(valid, sizes, (p.hout, p.wout))  # [n, T, hout], [n, T, wout]
    score = features.new_empty(T, n, dtype=torch.float32)
    rows = features.new_empty(T, n, dtype=torch.long)
    cols = torch.empty_like(rows)
    step = max(1, max_bytes // frame_bytes(p, c, T))
    if features.device.type == "cpu":
        step = min(step, cpu_chunk_frames())
    for s in range(0, n, step):
        f = slice(s, s + step)
        y = inverse(channel_sums(frame_spectra(features[f], p), spectra), p)  # [hout, wout, n', T]
        ok = ok_rows[f].permute(2, 0, 1)[:, None] & ok_cols[f].permute(2, 0, 1)[None]  # [hout, wout, n', T]
        best, at = y.masked_fill_(~ok, float("-inf")).view(p.hout * p.wout, -1, T).max(dim=0)  # [n', T]
        score[:, f], rows[:, f], cols[:, f] = (best / cells).T, (at // p.wout).T, (at % p.wout).T
    return score, rows, cols


@functools.lru_cache(maxsize=64)
def _size_tensors(sizes: tuple[tuple[int, int], ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Tensor[T, 2] long, Tensor[T] float32)``: the templates' ``(h, w)`` and cell counts
    on ``device``, made once per set of sizes: a copy from the host on every call would wait
    for the GPU's queued work, and cannot be part of a CUDA graph."""
    hw = torch.tensor(sizes, dtype=torch.long).view(-1, 2)
    return hw.to(device), (hw[:, 0] * hw[:, 1]).float().to(device)
