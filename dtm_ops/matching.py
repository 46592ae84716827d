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

from collections.abc import Sequence

import torch
from torch import nn


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
    ph, pw = h // 2, w // 2
    oh, ow = map_shape(grid, template)
    rows = torch.arange(oh, device=valid.device).view(1, -1) - ph  # top-left row of each position
    cols = torch.arange(ow, device=valid.device).view(1, -1) - pw
    vr = valid[:, 0].view(-1, 1)
    vc = valid[:, 1].view(-1, 1)
    # template rows / columns that lie on the frame's valid cells
    on_r = torch.minimum(rows + h, vr) - torch.clamp(rows, min=0)
    on_c = torch.minimum(cols + w, vc) - torch.clamp(cols, min=0)
    ok_r = on_r >= (h + 1) // 2
    ok_c = on_c >= (w + 1) // 2
    return ok_r[:, :, None] & ok_c[:, None, :]


#: Bound on the intermediate products of one call (the cell-by-cell similarities and their
#: padded copy): more templates than fit are matched in chunks, more frames in halves.
MAX_PRODUCT_BYTES = 512 << 20


def patchwise_cosine(
    features: torch.Tensor,
    templates: Sequence[torch.Tensor],
    valid: torch.Tensor | None = None,
    *,
    max_bytes: int = MAX_PRODUCT_BYTES,
) -> list[torch.Tensor]:
    """Similarity maps of every template over every frame, in one pass over the features.

    Args:
        features (Tensor[N, C, H, W]): frame features, unit-norm per valid cell, zero on padding.
        templates (list of Tensor[C, h_k, w_k]): unit-norm per cell; sizes may differ.
        valid (Tensor[N, 2], optional): valid ``(rows, cols)`` per frame; default the full grid.
        max_bytes: bound on the intermediate products (see :data:`MAX_PRODUCT_BYTES`).

    Returns:
        list of Tensor[N, oh_k, ow_k] (float32): one map per template, see :func:`map_shape`.

    One GEMM of all frame cells against all template cells (``[N*H*W, C] @ [C, sum h*w]``),
    then a shifted sum over template cells, one slice per cell offset for all templates of
    the same size. fp16 inputs multiply in fp16 and sum in fp32. When the products would
    exceed ``max_bytes`` (many queries, large scales), templates go in chunks of sizes
    grouped together, and frames in halves: the maps are the same.
    """
    _check(features, templates, valid)
    n, c, H, W = features.shape
    if not templates:
        return []
    per_cell = n * H * W * 4 * 2  # fp32 product and its padded copy, per template cell
    sizes = [int(t.shape[1] * t.shape[2]) for t in templates]
    if len(templates) > 1 and per_cell * sum(sizes) > max_bytes:
        order = sorted(range(len(templates)), key=lambda k: (templates[k].shape[1], templates[k].shape[2], k))
        chunks: list[list[int]] = [[]]
        load = 0
        for k in order:
            if chunks[-1] and (load + sizes[k]) * per_cell > max_bytes:
                chunks.append([])
                load = 0
            chunks[-1].append(k)
            load += sizes[k]
        out: list[torch.Tensor | None] = [None] * len(templates)
        for chunk in chunks:
            for k, m in zip(chunk, patchwise_cosine(features, [templates[k] for k in chunk], valid, max_bytes=max_bytes)):
                out[k] = m
        return out  # type: ignore[return-value]
    if n > 1 and per_cell * sum(sizes) > max_bytes:
        half = n // 2
        v = (None, None) if valid is None else (valid[:half], valid[half:])
        a = patchwise_cosine(features[:half], templates, v[0], max_bytes=max_bytes)
        b = patchwise_cosine(features[half:], templates, v[1], max_bytes=max_bytes)
        return [torch.cat([x, y]) for x, y in zip(a, b)]
    # Templates of one size form a group; within it, template cells are laid out
    # cell-major ([cell, template]), so each shift of the sum is one slice for the group.
    groups: dict[tuple[int, int], list[int]] = {}
    for k, t in enumerate(templates):
        groups.setdefault((int(t.shape[1]), int(t.shape[2])), []).append(k)
    blocks = [
        torch.stack([templates[k].reshape(c, -1) for k in idx], dim=2).reshape(c, -1) for idx in groups.values()
    ]
    tmat = torch.cat(blocks, dim=1).to(features.dtype)  # [C, K]
    cells = features.permute(0, 2, 3, 1).reshape(-1, c)  # [N*H*W, C]
    prod = (cells @ tmat).float().reshape(n, H, W, -1).permute(0, 3, 1, 2)  # [N, K, H, W]
    PH = max(h // 2 for h, _ in groups)
    PW = max(w // 2 for _, w in groups)
    padded = nn.functional.pad(prod, (PW, PW, PH, PH))
    if valid is None:
        valid = torch.tensor([[H, W]], device=features.device).expand(n, 2)
    valid = valid.to(features.device)
    maps: list[torch.Tensor | None] = [None] * len(templates)
    k0 = 0
    for (h, w), idx in groups.items():
        m = len(idx)
        ph, pw = h // 2, w // 2
        oh, ow = map_shape((H, W), (h, w))
        s = torch.zeros(n, m, max(oh, 0), max(ow, 0), device=features.device, dtype=torch.float32)
        if oh > 0 and ow > 0:
            for u in range(h):
                r0 = PH - ph + u
                for v in range(w):
                    c0 = PW - pw + v
                    k = k0 + (u * w + v) * m
                    s += padded[:, k : k + m, r0 : r0 + oh, c0 : c0 + ow]
            s /= h * w
            s.masked_fill_(~position_mask(valid, (H, W), (h, w))[:, None], float("-inf"))
        for j, k in enumerate(idx):
            maps[k] = s[:, j]
        k0 += h * w * m
    return maps  # type: ignore[return-value]


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
