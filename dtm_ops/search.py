"""Search: queries (image + ROIs) against a feature store, ranked by Deep Template Matching.

Per frame and ROI, the score is the best calibrated template score over positions and
scales (see :mod:`dtm_ops.calibration`). A query with several ROIs combines them by
``mode``: ``any`` (best ROI) or ``all`` (the frame must hold every ROI: the minimum of the
per-ROI scores).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import accumulate
from typing import Literal

import torch

from dtm_ops.allocator import retain_freed_memory
from dtm_ops.boxes import Box, validate_box
from dtm_ops.calibration import calibrate
from dtm_ops.centering import center, mean_cell
from dtm_ops.cudagraphs import GraphCache
from dtm_ops.errors import InputError
from dtm_ops.features import FeatureExtractor
from dtm_ops.matching import best_matches, patchwise_cosine
from dtm_ops.transfer import feed
from dtm_ops.media import open_image
from dtm_ops.store.format import FrameEntry, ShardEntry
from dtm_ops.store import FeatureStore
from dtm_ops.scales import DEFAULT_SCALES
from dtm_ops.templates import MAX_UPSAMPLE, Template, build_templates
from dtm_ops.topk import TopK

Mode = Literal["any", "all"]

#: Calibration reads frames from at most this many shards (evenly spaced over the store).
CALIBRATION_SHARDS = 8

#: Frames matched per step on the CPU: in scans of the default layer's features on this
#: project's 2-core CPU with one query, one query at 9 scales and 16 queries, 32 was the
#: fastest of 8, 16, 32, 64 and 128 in each case (4582, 508 and 1926 frames/s; the others
#: 0.67-0.92x of that), ``benchmarks/results/speed/scan-cpu-steps.txt``.
CPU_BATCH_FRAMES = 32

#: Features matched per step on CUDA, in bytes (at most ``MAX_GPU_BATCH_FRAMES`` frames):
#: 128 frames of C=256 at 68x120 in float16. A step costs the host a fixed time to launch
#: (on an H200, one 2x4 template over 239 frames: 580 us a call for 283 us of GPU work,
#: ``benchmarks/results/speed/h200/parts.txt``), so small steps leave the GPU idle; this
#: bounds the memory of a step and of the next one in flight instead.
GPU_BATCH_BYTES = 512 << 20
MAX_GPU_BATCH_FRAMES = 1024


@dataclass
class Query:
    """A query: ROIs (pixel boxes) on one image, optionally with class labels."""

    query_id: str
    source: str
    boxes: list[Box]
    labels: list[str | None] = field(default_factory=list)
    mode: Mode = "any"

    def __post_init__(self) -> None:
        if self.mode not in ("any", "all"):
            raise InputError(f"mode must be 'any' or 'all', got {self.mode!r}", record=self.query_id, field="mode")
        if not self.boxes:
            raise InputError("a query needs at least one box", record=self.query_id, field="boxes")
        if not self.labels:
            self.labels = [None] * len(self.boxes)
        if len(self.labels) != len(self.boxes):
            raise InputError(
                f"{len(self.labels)} labels for {len(self.boxes)} boxes", record=self.query_id, field="labels"
            )


@dataclass
class RoiMatch:
    roi_index: int
    score: float  # calibrated
    cosine: float  # raw patchwise cosine at the best position
    box: Box  # pixels of the frame
    scale: float


@dataclass
class Hit:
    query_id: str
    frame_id: str
    rank: int
    score: float
    cosine: float
    box: Box
    scale: float
    roi_index: int
    source: str
    sequence: str
    index: int
    frame_scale: float  # resize scale of the frame's features (places the heat map)
    rois: list[RoiMatch]
    heatmap: torch.Tensor | None = None  # Tensor[H, W] over the frame's cells (calibrated)

    def to_record(self) -> dict:
        rec = {k: v for k, v in asdict(self).items() if k != "heatmap"}
        rec["box"] = [round(v, 2) for v in self.box]
        for r in rec["rois"]:
            r["box"] = [round(v, 2) for v in r["box"]]
        return rec


@dataclass
class PreparedQuery:
    """A query with its calibrated templates: what the scan needs, built once per run."""

    query: Query
    templates: list[Template]  # features already centred when ``lake_mean`` is set
    exclude: tuple[str, int] | None  # (sequence, index) of the query frame when it is in the lake
    lake_mean: torch.Tensor | None = None  # Tensor[C]: the mean cell to centre on (dtm_ops.centering)


def save_prepared(prepared: Sequence[PreparedQuery], fingerprint) -> bytes:
    """Prepared queries -> safetensors bytes (template tensors + JSON metadata; no pickle)."""
    import json

    from safetensors.torch import save

    tensors, meta = {}, []
    for p in prepared:
        temps = []
        for t in p.templates:
            name = f"t{len(tensors)}"
            tensors[name] = t.features.contiguous()
            temps.append({"tensor": name, "roi_index": t.roi_index, "scale": t.scale, "rel_box": list(t.rel_box),
                          "mu": t.mu, "sigma": t.sigma})
        if p.lake_mean is not None:
            tensors["lake_mean"] = p.lake_mean.contiguous()
        q = p.query
        meta.append({"query_id": q.query_id, "source": q.source, "boxes": [list(b) for b in q.boxes],
                     "labels": q.labels, "mode": q.mode, "exclude": list(p.exclude) if p.exclude else None,
                     "templates": temps})
    return save(tensors, metadata={"fingerprint": fingerprint.id, "queries": json.dumps(meta)})


def load_prepared(data: bytes, fingerprint) -> list[PreparedQuery]:
    """Inverse of :func:`save_prepared`; refuses templates made for another feature extractor."""
    import json

    from safetensors.torch import load

    from dtm_ops.errors import FingerprintMismatch

    tensors = load(data)
    header_len = int.from_bytes(data[:8], "little")
    metadata = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    if metadata.get("fingerprint") != fingerprint.id:
        raise FingerprintMismatch(
            f"templates were made for features {metadata.get('fingerprint')}, the store holds {fingerprint.id}"
        )
    out = []
    for m in json.loads(metadata["queries"]):
        q = Query(query_id=m["query_id"], source=m["source"], boxes=[tuple(b) for b in m["boxes"]],
                  labels=m["labels"], mode=m["mode"])
        temps = [Template(query_id=q.query_id, roi_index=t["roi_index"], scale=t["scale"], features=tensors[t["tensor"]],
                          rel_box=tuple(t["rel_box"]), mu=t["mu"], sigma=t["sigma"]) for t in m["templates"]]
        out.append(PreparedQuery(q, temps, tuple(m["exclude"]) if m["exclude"] else None, tensors.get("lake_mean")))
    return out


class Searcher:
    """Runs queries over a feature store.

    Args:
        extractor: must have the store's fingerprint.
        scales: template scales tried (see :mod:`dtm_ops.templates`).
        margin: context cells around each ROI's template.
        top_k: hits kept per query.
        exclude_window: frames of the query frame's own sequence within this many frames of
            it are skipped (near-duplicates); ``-1`` keeps them all, ``0`` skips only the
            query frame itself.
        calibration_frames: frames sampled evenly from the store to calibrate templates;
            0 turns calibration off (scores are then raw cosines, which favour small scales).
        max_upsample: templates come from the query image enlarged at most this much
            (:mod:`dtm_ops.templates`).
        center: match mean-centred cells (:mod:`dtm_ops.centering`), the mean taken over the
            calibration sample; needs calibration frames. Off by default: neutral in the
            retrieval evaluation (README "Retrieval quality").
        batch_frames: frames matched per step (bounds memory); default
            :data:`CPU_BATCH_FRAMES` on the CPU, :data:`GPU_BATCH_BYTES` of features on CUDA.
        cuda_graphs: on CUDA, replay each step's matching from CUDA graphs
            (:meth:`batch_matcher`). Off by default: a scan from storage waits on its reads,
            not on the matcher, and the captures cost more than they saved in the scans
            measured (README "Matcher speed").
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        *,
        scales: Sequence[float] = DEFAULT_SCALES,
        margin: int = 0,
        top_k: int = 20,
        exclude_window: int = 0,
        calibration_frames: int = 64,
        center: bool = False,
        max_upsample: float = MAX_UPSAMPLE,
        batch_frames: int | None = None,
        cuda_graphs: bool = False,
        progress: bool = False,
    ) -> None:
        self.extractor = extractor
        self.scales = tuple(scales)
        self.margin = margin
        self.top_k = top_k
        self.exclude_window = exclude_window
        self.calibration_frames = calibration_frames
        self.center = center
        self.max_upsample = max_upsample
        self.batch_frames = batch_frames
        self.cuda_graphs = cuda_graphs
        self.progress = progress
        self.device = extractor.device

    # ------------------------------------------------------------ templates
    def prepare(self, queries: Sequence[Query], store: FeatureStore) -> list[PreparedQuery]:
        manifest = store.manifest()
        self.extractor.fingerprint.check_same(manifest.fingerprint, what=f"features in {store.uri}")
        by_source = {f.source: f for s in manifest.shards for f in s.frames}
        seen: set[str] = set()
        prepared = []
        for q in queries:
            if q.query_id in seen:
                raise InputError("duplicate query id", record=q.query_id, field="id")
            seen.add(q.query_id)
            image = open_image(q.source, record=q.query_id, field="image")
            boxes = [
                validate_box(b, *image.size, source=q.source, record=q.query_id, field=f"boxes[{i}]")
                for i, b in enumerate(q.boxes)
            ]
            templates = build_templates(
                self.extractor, image, boxes, query_id=q.query_id, scales=self.scales, margin=self.margin,
                max_upsample=self.max_upsample,
            )
            entry = by_source.get(q.source)
            prepared.append(PreparedQuery(q, templates, (entry.sequence, entry.index) if entry else None))
        if self.calibration_frames > 0:
            sample = list(self._sample_batches(store))
            mu = mean_cell((f, v) for f, v, _ in sample) if self.center else None
            for p in prepared:
                p.lake_mean = mu
                for t in p.templates:
                    t.features = center(t.features, mu, dim=0)
            calibrate([t for p in prepared for t in p.templates],
                      ((center(f, mu, dim=1), v, seqs) for f, v, seqs in sample), self.device,
                      skip=[p.exclude[0] if p.exclude else None for p in prepared for _ in p.templates])
        return prepared

    def _sample_batches(self, store: FeatureStore) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """Calibration frames, read from at most ``CALIBRATION_SHARDS`` shards (the cost is
        bounded however large the lake). The shards are those at evenly spaced points of the
        lake's frame order, and the frames are spread evenly over them, so each contributes
        in proportion to its size: the sample keeps the lake's mix of scenes.

        The frame order is by frame id, not the manifest's shard order: indexing tasks
        commit their shards in the order they finish, so the same frames indexed twice are
        listed in another order, and a sample taken in that order would change the
        calibration, and so the ranking, from one indexing run to the next."""
        shards = sorted(store.manifest().shards, key=lambda s: min((f.frame_id for f in s.frames), default=""))
        total = sum(len(s.frames) for s in shards)
        if total == 0:
            return
        starts = [0, *accumulate(len(s.frames) for s in shards)]  # linear: a 10M-frame lake has 39k shards
        points = [(j + 0.5) * total / CALIBRATION_SHARDS for j in range(CALIBRATION_SHARDS)]
        picked = sorted({bisect_right(starts, p) - 1 for p in points})  # the shard each point falls in
        pool = sum(len(shards[i].frames) for i in picked)
        n = min(self.calibration_frames, pool)
        wanted = {int((j + 0.5) * pool / n) for j in range(n)}  # evenly over the picked shards' frames
        offset = 0
        for entry, feats, valid in store.iter_shards([shards[i] for i in picked]):
            rows = [r for r in range(len(entry.frames)) if offset + r in wanted]
            offset += len(entry.frames)
            step = self.frames_per_step(feats)
            for start in range(0, len(rows), step):
                sel = rows[start : start + step]
                yield feats[sel].float(), valid[sel], [entry.frames[r].sequence for r in sel]

    # ------------------------------------------------------------ scan
    def frames_per_step(self, features: torch.Tensor) -> int:
        """Frames matched per step for a shard's ``features (Tensor[N, C, H, W])``:
        ``batch_frames`` where given, else the device's default (see the constructor)."""
        if self.batch_frames is not None:
            return self.batch_frames
        if self.device.type != "cuda":
            return CPU_BATCH_FRAMES
        frame_bytes = features[0].numel() * 2  # matched in float16 on CUDA
        return max(1, min(MAX_GPU_BATCH_FRAMES, GPU_BATCH_BYTES // max(1, frame_bytes)))

    def search(self, store: FeatureStore, queries: Sequence[Query], *, heatmaps: bool = True) -> dict[str, list[Hit]]:
        """Run every query in one pass over the store; returns hits per query, best first."""
        prepared = self.prepare(queries, store)
        heaps = self.scan(store, prepared)
        results = {}
        for p in prepared:
            hits = [payload for _, _, payload in heaps[p.query.query_id].items()]
            for rank, hit in enumerate(hits, 1):
                hit.rank = rank
            results[p.query.query_id] = hits
        if heatmaps:
            self.attach_heatmaps(store, prepared, results)
        return results

    def scan(
        self, store: FeatureStore, prepared: Sequence[PreparedQuery], shards: Sequence[ShardEntry] | None = None
    ) -> dict[str, TopK]:
        """Top-k per query over ``shards`` (default: all): what a mapped scan task computes."""
        from tqdm import tqdm

        if self.device.type != "cuda":
            retain_freed_memory()  # batch after batch the same large tensors: keep their pages
        templates = [t for p in prepared for t in p.templates]
        lake_mean = prepared[0].lake_mean if prepared else None
        tfeats = [t.features.to(self.device, self._dtype()) for t in templates]
        mu = torch.tensor([t.mu for t in templates], dtype=torch.float64)
        sigma = torch.tensor([t.sigma for t in templates], dtype=torch.float64)
        heaps = {p.query.query_id: TopK(self.top_k) for p in prepared}
        shards = list(store.manifest().shards if shards is None else shards)
        bar = tqdm(total=sum(len(s.frames) for s in shards), unit="frame", disable=not self.progress, desc="scan")
        cuda = self.device.type == "cuda"

        def batches():
            for entry, feats, valid in store.iter_shards(shards, pin_memory=cuda):
                step = self.frames_per_step(feats)
                for start in range(0, len(entry.frames), step):
                    sl = slice(start, start + step)
                    yield (entry, sl), feats[sl], valid[sl]

        match = self.batch_matcher(tfeats, lake_mean)
        for (entry, sl), f, v in feed(batches(), self.device, self.feed_dtype(lake_mean)):
            score, rows, cols = match(f, v)  # each [T, n]
            cos, rows, cols = score.double().cpu(), rows.cpu(), cols.cpu()
            z = (cos - mu[:, None]) / sigma[:, None]
            self._collect(prepared, entry.frames[sl], z, cos, rows, cols, heaps)
            bar.update(f.shape[0])
        bar.close()
        return heaps

    def batch_matcher(
        self, templates: Sequence[torch.Tensor], lake_mean: torch.Tensor | None
    ) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The scan's work per batch: ``(features Tensor[n, C, H, W], valid Tensor[n, 2])`` ->
        ``(score, row, col)``, each ``Tensor[T, n]``, of :func:`dtm_ops.matching.best_matches`
        on the centred features. With ``cuda_graphs`` on CUDA, replayed from CUDA graphs for
        batch buffers that come back (:class:`dtm_ops.cudagraphs.GraphCache`; ``valid`` is
        copied in, being made per batch): for small templates the host's work per batch
        takes longer than the GPU's."""
        def match(features: torch.Tensor, valid: torch.Tensor):
            return best_matches(center(features, lake_mean, dim=1), templates, valid)

        return GraphCache(match, copied=(1,)) if self.cuda_graphs and self.device.type == "cuda" else match

    def _dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32

    def feed_dtype(self, lake_mean: torch.Tensor | None) -> torch.dtype | None:
        """The dtype the scan's batches reach the matcher in (:func:`dtm_ops.transfer.feed`):
        float16 on CUDA; on the CPU, as stored (``None``), the matcher converting fp16 a
        chunk of frames at a time as it reads them (:func:`dtm_ops.matching.compute_dtype`),
        or float32 where the batches are centred first (``lake_mean``): centring computes."""
        if self.device.type == "cuda" or lake_mean is not None:
            return self._dtype()
        return None

    def _collect(self, prepared, frames: Sequence[FrameEntry], z, cos, rows, cols, heaps) -> None:
        """Push this batch's frames into each query's top-k.

        Args:
            z, cos (Tensor[T, n]): calibrated and raw best score per template and frame.
            rows, cols (Tensor[T, n]): map index of each best position.
        """
        t0 = 0
        for p in prepared:
            nt = len(p.templates)
            roi_ids = torch.tensor([t.roi_index for t in p.templates])
            best_score, best_t = [], []
            for k in range(len(p.query.boxes)):
                idx = (roi_ids == k).nonzero().flatten()
                sc, arg = z[t0 + idx].max(dim=0)  # ties: the first (smallest) scale
                best_score.append(sc)
                best_t.append(idx[arg])
            per_roi = torch.stack(best_score)  # [R, n]
            combined = per_roi.max(dim=0).values if p.query.mode == "any" else per_roi.min(dim=0).values
            heap = heaps[p.query.query_id]
            for n in (combined >= heap.threshold()).nonzero().flatten().tolist():
                frame = frames[n]
                if not math.isfinite(combined[n].item()) or self._excluded(p, frame):
                    continue
                matches = []
                for k in range(len(p.query.boxes)):
                    i = int(best_t[k][n])
                    t = p.templates[i]
                    matches.append(
                        RoiMatch(
                            roi_index=k,
                            score=per_roi[k, n].item(),
                            cosine=cos[t0 + i, n].item(),
                            box=self._hit_box(t, frame, int(rows[t0 + i, n]), int(cols[t0 + i, n])),
                            scale=t.scale,
                        )
                    )
                pick = max if p.query.mode == "any" else min
                lead = pick(matches, key=lambda m: (m.score, -m.roi_index))
                heap.push(
                    lead.score,
                    frame.frame_id,
                    Hit(
                        query_id=p.query.query_id,
                        frame_id=frame.frame_id,
                        rank=0,
                        score=lead.score,
                        cosine=lead.cosine,
                        box=lead.box,
                        scale=lead.scale,
                        roi_index=lead.roi_index,
                        source=frame.source,
                        sequence=frame.sequence,
                        index=frame.index,
                        frame_scale=frame.scale,
                        rois=matches,
                    ),
                )
            t0 += nt

    def _excluded(self, p: PreparedQuery, frame: FrameEntry) -> bool:
        if p.exclude is None or self.exclude_window < 0:
            return False
        seq, idx = p.exclude
        return frame.sequence == seq and abs(frame.index - idx) <= self.exclude_window

    def _hit_box(self, t: Template, frame: FrameEntry, row: int, col: int) -> Box:
        """Map index -> the ROI's box in the frame's original pixels, clipped to the frame."""
        h, w = t.size
        top, left = row - h // 2, col - w // 2
        s = self.extractor.stride / frame.scale
        x1, y1, x2, y2 = t.rel_box
        return (
            min(max((left + x1) * s, 0.0), frame.width),
            min(max((top + y1) * s, 0.0), frame.height),
            min(max((left + x2) * s, 0.0), frame.width),
            min(max((top + y2) * s, 0.0), frame.height),
        )

    # ------------------------------------------------------------ heat maps
    def attach_heatmaps(self, store: FeatureStore, prepared, results: dict[str, list[Hit]]) -> None:
        """Recompute similarity maps for the hits only, as calibrated heat per frame cell."""
        from dtm_ops.heatmap import cell_heat

        ids = {h.frame_id for hits in results.values() for h in hits}
        feats = store.frame_features(sorted(ids))
        for p in prepared:
            for hit in results[p.query.query_id]:
                entry, f = feats[hit.frame_id]
                heat = None
                for m in hit.rois:
                    t = next(t for t in p.templates if t.roi_index == m.roi_index and t.scale == m.scale)
                    smap = patchwise_cosine(
                        center(f[None].to(self.device, self._dtype()), p.lake_mean, dim=1),
                        [t.features.to(self.device, self._dtype())],
                        torch.tensor([entry.valid], device=self.device),
                    )[0][0].cpu()
                    z = cell_heat((smap - t.mu) / t.sigma, t.size)
                    heat = z if heat is None else torch.maximum(heat, z)
                hit.heatmap = heat
