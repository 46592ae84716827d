"""GPU scan kernel: the shifted sum of cell products and the best position per frame, fused.

The scan needs, per frame and template, only the best position and its score. On CUDA
this module gets them without a similarity map ever reaching GPU memory:

1. one GEMM (cuBLAS, tensor cores) of each group's template cells against the frame cells:
   ``P[N, m*h*w, H*W] = T[m*h*w, C] @ F[N, C, H*W]``;
2. one Triton kernel that reads each product exactly once, sums the ``h*w`` shifted
   slices of a block of positions in registers, applies the border rule
   (:func:`dtm_ops.matching.position_mask`), and keeps the block's best score and
   position: only ``[N, m, blocks]`` partial results are written.

Memory traffic per frame is the features plus twice the products (``m*h*w / C`` of the
features), so this wins while a size group has fewer template cells than channels; for
many templates of one size, direct convolution holds no products and wins
(:func:`dtm_ops.matching.best_matches` picks by timing). Triton compiles for the GPU; with
``TRITON_INTERPRET=1`` the same kernel runs on CPU tensors (the tests check it so, against
the reference loop).
"""

from __future__ import annotations

import functools

import torch

from dtm_ops.matching import MAX_PRODUCT_BYTES, map_shape, product_chunks


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def shift_max(
        P, valid, out_score, out_index,
        H, W, oh, ow, h, w, n_blocks,
        stride_pn, stride_pk,
        BR: tl.constexpr, BW: tl.constexpr, WC: tl.constexpr,
    ):
        """One program: frame ``n``, template ``q``, map rows ``[rb*BR, rb*BR + BR)``.
        ``WC``: the template width as a compile-time constant (its loop unrolled, so its
        loads are in flight together), or 0 for a loop."""
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
            fr = top + u
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

    return shift_max


def available(device: torch.device) -> bool:
    """Whether :func:`group_best` can run here: CUDA with Triton (or the interpreter)."""
    import os

    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


#: Launch settings: elements per program (``BR`` map rows x ``BW`` columns), warps, and
#: whether the template-width loop is unrolled (compiled once per width). Chosen by
#: ``benchmarks/bench_matcher.py --tune`` on an H200 (README "Matcher speed"): 512
#: elements, 4 warps, unrolled was best or within 10% of best for templates 2x4 to 17x30
#: with 1 and 16 queries.
TUNING = {"elements": 512, "num_warps": 4, "unroll": True}


def group_best(
    features: torch.Tensor, group: torch.Tensor, valid: torch.Tensor, max_bytes: int = MAX_PRODUCT_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best score and map position per frame for templates of one size.

    Args:
        features (Tensor[N, C, H, W]): frame features, unit-norm per valid cell.
        group (Tensor[m, C, h, w]): templates of one size, in the features' dtype.
        valid (Tensor[N, 2]): valid ``(rows, cols)`` per frame.
        max_bytes: bound on the products of one GEMM (:func:`dtm_ops.matching.product_chunks`).

    Returns:
        ``(score Tensor[N, m] float32, index Tensor[N, m] int64)``: the mean cosine at the
        best position allowed by the border rule and its flat index into the
        ``oh x ow`` map of :func:`dtm_ops.matching.map_shape` (``-inf`` and 0 where none is
        allowed). Ties go to the first position in row-major order.
    """
    n, c, H, W = features.shape
    m, _, h, w = group.shape
    score = features.new_empty(n, m, dtype=torch.float32)
    index = features.new_empty(n, m, dtype=torch.long)
    valid = valid.to(device=features.device, dtype=torch.int32)
    for fs, ts in product_chunks(n, m, H * W * h * w * features.element_size(), max_bytes):
        score[fs, ts], index[fs, ts] = _launch(features[fs], group[ts], valid[fs].contiguous())
    return score, index


def _launch(features: torch.Tensor, group: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`group_best` for one chunk: the GEMM, then the kernel over ``(frame, template,
    block of map rows)``, then the best block per frame and template."""
    n, c, H, W = features.shape
    m, _, h, w = group.shape
    cells = group.reshape(m, c, h * w).transpose(1, 2).reshape(m * h * w, c)  # rows (template, u, v)
    prod = torch.matmul(cells, features.reshape(n, c, H * W))  # [N, m*h*w, H*W]
    oh, ow = map_shape((H, W), (h, w))
    BW = max(16, 1 << (ow - 1).bit_length())
    BR = max(1, min(64, TUNING["elements"] // BW, 1 << (oh - 1).bit_length()))
    blocks = -(-oh // BR)
    score = torch.empty(n, m, blocks, device=features.device, dtype=torch.float32)
    index = torch.empty(n, m, blocks, device=features.device, dtype=torch.int32)
    _kernel()[(n, m, blocks)](
        prod, valid, score, index, H, W, oh, ow, h, w, blocks, prod.stride(0), prod.stride(1),
        BR=BR, BW=BW, WC=w if TUNING["unroll"] else 0, num_warps=TUNING["num_warps"],
    )
    best, block = score.max(dim=2)  # ties: the first block, so the first position overall
    return best, index.gather(2, block[..., None])[..., 0].long()
