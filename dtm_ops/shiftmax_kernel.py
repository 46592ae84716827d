"""The Triton kernel of :mod:`dtm_ops.shiftmax` (imported only when a scan runs it: Triton
is heavy to import, and absent where torch was installed without it)."""

import triton
import triton.language as tl


@triton.jit
def _add_row(acc, base, fr, left, in_map, u, H, W, w, stride_pk, WC: tl.constexpr):
    """``acc`` plus the products of template row ``u``: frame row ``fr`` (Tensor[BR])
    and columns ``left + v`` (Tensor[BW]) of product row ``u * w + v``, for each ``v``."""
    row_ok = in_map & ((fr >= 0) & (fr < H))[:, None]
    at = base + u * w * stride_pk + fr[:, None] * W
    if WC > 0:
        for v in tl.static_range(WC):
            fc = left + v
            ok = row_ok & ((fc >= 0) & (fc < W))[None, :]
            acc += tl.load(at + v * stride_pk + fc[None, :], mask=ok, other=0.0).to(tl.float32)
    else:
        for v in range(0, w):
            fc = left + v
            ok = row_ok & ((fc >= 0) & (fc < W))[None, :]
            acc += tl.load(at + v * stride_pk + fc[None, :], mask=ok, other=0.0).to(tl.float32)
    return acc


@triton.jit
def shift_max(
    P, valid, out_score, out_index,
    H, W, oh, ow, h, w, n_blocks,
    stride_pn, stride_pk,
    BR: tl.constexpr, BW: tl.constexpr, WC: tl.constexpr,
):
    """One program: frame ``n``, template ``q``, map rows ``[rb*BR, rb*BR + BR)``.
    ``WC``: the template width as a compile-time constant (its loop unrolled, so its loads
    are in flight together), or 0 for a loop."""
    n = tl.program_id(0)
    q = tl.program_id(1)
    rb = tl.program_id(2)
    rows = rb * BR + tl.arange(0, BR)  # map rows: top-left row is rows - h // 2
    cols = tl.arange(0, BW)
    top = rows - h // 2
    left = cols - w // 2
    in_map = (rows < oh)[:, None] & (cols < ow)[None, :]
    acc = tl.zeros([BR, BW], dtype=tl.float32)
    base = P + n.to(tl.int64) * stride_pn + (q * h * w).to(tl.int64) * stride_pk
    for u in range(0, h):
        acc = _add_row(acc, base, top + u, left, in_map, u, H, W, w, stride_pk, WC)
    vr = tl.load(valid + 2 * n)
    vc = tl.load(valid + 2 * n + 1)
    on_r = tl.minimum(top + h, vr) - tl.maximum(top, 0)
    on_c = tl.minimum(left + w, vc) - tl.maximum(left, 0)
    allowed = in_map & (on_r >= (h + 1) // 2)[:, None] & (on_c >= (w + 1) // 2)[None, :]
    acc = tl.where(allowed, acc, float("-inf"))
    best, at_max = tl.max(tl.reshape(acc, [BR * BW]), axis=0, return_indices=True)
    index = (rb * BR + at_max // BW) * ow + at_max % BW
    o = (n * tl.num_programs(1) + q) * n_blocks + rb
    tl.store(out_score + o, best / (h * w))
    tl.store(out_index + o, index)
