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

import torch

from dtm_ops.matching import MAX_PRODUCT_BYTES, map_shape, product_chunks, template_cells


def _kernel():
    from dtm_ops.shiftmax_kernel import shift_max

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
#: whether the template-width loop is unrolled (compiled once per width). Chosen on an H200
#: (README "Matcher speed"): 512 elements, 4 warps, unrolled was best or within 10% of best
#: for templates 2x4 to 17x30 with 1 and 16 queries (``bench_matcher.py --tune``); 2048
#: elements, 8 warps, the height loop unrolled as well, or one frame's row blocks as
#: neighbouring programs were no faster on the GEMM's products alone (``--parts``), except
#: for 7x12 templates (8 warps 3-9%, neighbouring blocks 7% with 16 queries), and both ran
#: 2x4 templates at about half the speed.
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
    """:func:`group_best` for one chunk: the GEMM (:func:`products`), then :func:`reduce`."""
    return reduce(products(features, group), valid, features.shape[2:], group.shape[2:])


def products(features: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Every template cell against every frame cell, one GEMM (tensor cores on CUDA).

    Args:
        features (Tensor[N, C, H, W]): frame features.
        group (Tensor[m, C, h, w]): templates of one size, in the features' dtype.

    Returns:
        Tensor[N, m*h*w, H*W]: rows in ``(template, u, v)`` order.
    """
    n, c, H, W = features.shape
    return torch.matmul(template_cells(group), features.reshape(n, c, H * W))


def reduce(
    prod: torch.Tensor, valid: torch.Tensor, grid: tuple[int, int], template: tuple[int, int], **settings
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel over ``(frame, template, block of map rows)``, then the best block per
    frame and template: :func:`group_best`'s result from the products.

    Args:
        prod (Tensor[N, m*h*w, H*W]): :func:`products`.
        valid (Tensor[N, 2] int32): valid ``(rows, cols)`` per frame, contiguous.
        grid, template: ``(H, W)`` and ``(h, w)``.
        settings: launch settings overriding :data:`TUNING` (for the benchmarks).
    """
    (H, W), (h, w) = grid, template
    n, m = prod.shape[0], prod.shape[1] // (h * w)
    tune = {**TUNING, **settings}
    oh, ow = map_shape((H, W), (h, w))
    BW = max(16, 1 << (ow - 1).bit_length())
    BR = max(1, min(64, tune["elements"] // BW, 1 << (oh - 1).bit_length()))
    blocks = -(-oh // BR)
    score = torch.empty(n, m, blocks, device=prod.device, dtype=torch.float32)
    index = torch.empty(n, m, blocks, device=prod.device, dtype=torch.int32)
    _kernel()[(n, m, blocks)](
        prod, valid, score, index, H, W, oh, ow, h, w, blocks, prod.stride(0), prod.stride(1),
        BR=BR, BW=BW, WC=w if tune["unroll"] else 0, num_warps=tune["num_warps"],
    )
    best, block = score.max(dim=2)  # ties: the first block, so the first position overall
    return best, index.gather(2, block[..., None])[..., 0].long()
