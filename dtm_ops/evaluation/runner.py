"""``dtm eval``: run every method over an evaluation set and write what it measured.

Outputs (in ``out``):

- ``summary.md`` / ``summary.csv``: per method, overall and per ROI-area bucket: P@10,
  P@50, P@100, mAP, and localisation (share of relevant hits among the first 50 whose
  best-match box has IoU >= 0.5 with a box of the query's class);
- ``per_query.csv``: the same per query and method, to inspect failures;
- ``precision_by_area.png``: P@K by ROI-area bucket, DTM against the baselines;
- ``worst.html``: the queries where DTM did worst (AP), each with its first hits and boxes.

The lake's features (the store) and pooled vectors are cached in ``out/cache`` and reused
while the set and the extractor stay the same.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dtm_ops.evaluation.metrics import KS, average_precision, localisation, precision_at_k
from dtm_ops.evaluation.sets import BUCKETS, EvalSet, area_bucket
from dtm_ops.fileio import atomic_write

METHODS = ("dtm", "global-avg", "global-gem", "roi-pooled", "roi>dtm", "dtm+roi")
BOXED = {"dtm", "roi>dtm", "dtm+roi"}  # methods whose hits carry DTM's box


@dataclass
class EvalConfig:
    backbone: str = "efficientnet_lite0"
    layer: str = "block_s16"
    pooled_layer: str = "head"
    long_side: int = 640
    scales: tuple[float, ...] | None = None
    margin: int = 0
    center: bool = False
    max_upsample: float = 2.0
    shortlist: int = 100
    methods: tuple[str, ...] = METHODS
    device: str | None = None
    progress: bool = False


def _cache_key(es: EvalSet, cfg: EvalConfig, layer: str) -> str:
    """Cached features belong to one set where it lies (frames are found by their paths:
    a moved set is indexed again) and to one extractor (``rd``: frames decoded reduced,
    :mod:`dtm_ops.preprocess`; caches from before it are not reused)."""
    import hashlib

    where = hashlib.sha256(str(es.root.resolve()).encode()).hexdigest()[:8]
    return f"{cfg.backbone}-{layer}-{cfg.long_side}-rd-{where}"


def _index(es: EvalSet, cfg: EvalConfig, out: Path):
    """The lake's feature store (built once per set and extractor)."""
    from dtm_ops.features import FeatureExtractor
    from dtm_ops.indexing import index_frames
    from dtm_ops.media import FrameRef
    from dtm_ops.store import FeatureStore

    extractor = FeatureExtractor(cfg.backbone, cfg.layer, long_side=cfg.long_side, device=cfg.device)
    store = FeatureStore.open(str(out / "cache" / f"store-{_cache_key(es, cfg, cfg.layer)}"))
    refs = [FrameRef(frame_id=f.frame_id, source=es.path(f.image), sequence=f.sequence, index=f.index) for f in es.frames]
    index_frames(refs, store, extractor, progress=cfg.progress)
    return extractor, store


def _pooled_frames(es: EvalSet, cfg: EvalConfig, out: Path, extractor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average and GeM vectors of every lake frame (Tensor[N, C] each), cached."""
    from safetensors.torch import load_file, save_file

    from dtm_ops.evaluation.rankers import embed_frames
    from dtm_ops.media import read_image

    path = out / "cache" / f"pooled-{_cache_key(es, cfg, cfg.pooled_layer)}.safetensors"
    ids = [f.frame_id for f in es.frames]
    if path.exists():
        d = load_file(str(path))
        meta = json.loads((path.with_suffix(".json")).read_text())
        if meta["ids"] == ids:
            return d["avg"], d["gem"]
    images = [read_image(es.path(f.image)) for f in es.frames]  # decoded as indexing decodes them
    avg, gem = embed_frames(extractor, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"avg": avg.contiguous(), "gem": gem.contiguous()}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"ids": ids}))
    return avg, gem


def evaluate(set_dir: str | Path, out: str | Path, cfg: EvalConfig | None = None) -> dict:
    """Run the methods over the set; write the outputs; return the summary rows."""
    from dtm_ops.evaluation.rankers import embed_frames, rerank, standardise
    from dtm_ops.features import FeatureExtractor
    from dtm_ops.media import open_image
    from dtm_ops.search import Query, Searcher
    from dtm_ops.scales import DEFAULT_SCALES

    cfg = cfg or EvalConfig()
    es = EvalSet.load(set_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    index_of = {f.frame_id: i for i, f in enumerate(es.frames)}
    n = len(es.frames)

    scores: dict[str, torch.Tensor] = {}  # method -> Tensor[Q, N]
    boxes: dict[tuple[int, int], tuple] = {}  # (query, frame) -> DTM box
    need_dtm = any(m in BOXED for m in cfg.methods)
    need_pooled = any(m not in ("dtm",) for m in cfg.methods)
    if need_dtm:
        extractor, store = _index(es, cfg, out)
        searcher = Searcher(extractor, scales=cfg.scales or DEFAULT_SCALES, margin=cfg.margin, top_k=n, exclude_window=-1,
                            center=cfg.center, max_upsample=cfg.max_upsample, progress=cfg.progress)
        queries = [Query(q.query_id, es.path(q.image), [tuple(q.box)], [q.cls]) for q in es.queries]
        results = searcher.search(store, queries, heatmaps=False)
        dtm = torch.full((len(es.queries), n), -math.inf, dtype=torch.float64)
        for qi, q in enumerate(es.queries):
            for h in results[q.query_id]:
                dtm[qi, index_of[h.frame_id]] = h.score
                boxes[(qi, index_of[h.frame_id])] = h.box
        scores["dtm"] = dtm
    if need_pooled:
        head = FeatureExtractor(cfg.backbone, cfg.pooled_layer, long_side=cfg.long_side, device=cfg.device)
        favg, fgem = _pooled_frames(es, cfg, out, head)
        qimgs = [open_image(es.path(q.image)) for q in es.queries]
        qavg, qgem = embed_frames(head, qimgs)
        crops = [img.crop(tuple(round(v) for v in q.box)) for img, q in zip(qimgs, es.queries)]
        ravg, _ = embed_frames(head, crops)
        scores["global-avg"] = (qavg @ favg.T).double()
        scores["global-gem"] = (qgem @ fgem.T).double()
        scores["roi-pooled"] = (ravg @ favg.T).double()
    if "roi>dtm" in cfg.methods:
        scores["roi>dtm"] = torch.stack([rerank(scores["roi-pooled"][i], scores["dtm"][i], cfg.shortlist)
                                         for i in range(len(es.queries))])
    if "dtm+roi" in cfg.methods:
        scores["dtm+roi"] = torch.stack([standardise(scores["dtm"][i].clamp(min=-1e6)) + standardise(scores["roi-pooled"][i])
                                         for i in range(len(es.queries))])

    rows = []
    rankings: dict[tuple[str, str], list] = {}
    for qi, q in enumerate(es.queries):
        cands = es.candidates(q)
        relevant = {f.frame_id for f in cands if q.cls in f.classes()}
        gt = {f.frame_id: [o.box for o in f.objects if o.cls == q.cls] for f in cands if f.frame_id in relevant}
        idx = torch.tensor([index_of[f.frame_id] for f in cands])
        for m in cfg.methods:
            s = scores[m][qi, idx]
            order = sorted(range(len(cands)), key=lambda j: (-float(s[j]), cands[j].frame_id))
            ranked = [(cands[j].frame_id, boxes.get((qi, int(idx[j]))) if m in BOXED else None) for j in order]
            rankings[(q.query_id, m)] = ranked
            ids = [fid for fid, _ in ranked]
            good, total = localisation(ranked, gt) if m in BOXED else (0, 0)
            rows.append({"query_id": q.query_id, "class": q.cls, "area": q.area, "bucket": area_bucket(q.area), "method": m,
                         "relevant": len(relevant), "candidates": len(cands),
                         **{f"P@{k}": precision_at_k(ids, relevant, k) for k in KS},
                         "AP": average_precision(ids, relevant), "loc_good": good, "loc_total": total})
    summary = summarise(rows, cfg.methods)
    _write(out, es, cfg, rows, summary, rankings)
    return {"rows": rows, "summary": summary}


def summarise(rows: list[dict], methods) -> list[dict]:
    """Mean P@K and AP (mAP) per method, overall and per bucket; localisation pooled."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["relevant"] == 0:
            continue
        groups[(r["method"], "all")].append(r)
        groups[(r["method"], r["bucket"])].append(r)
    out = []
    for m in methods:
        for b in ["all"] + [b[0] for b in BUCKETS]:
            g = groups.get((m, b), [])
            if not g:
                continue
            loc_total = sum(r["loc_total"] for r in g)
            out.append({"method": m, "bucket": b, "queries": len(g),
                        **{f"P@{k}": sum(r[f"P@{k}"] for r in g) / len(g) for k in KS},
                        "mAP": sum(r["AP"] for r in g) / len(g),
                        "loc": (sum(r["loc_good"] for r in g) / loc_total) if loc_total else None})
    return out


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown_table(summary: list[dict]) -> str:
    cols = ["method", "bucket", "queries", *[f"P@{k}" for k in KS], "mAP", "loc"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in summary:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _write(out: Path, es: EvalSet, cfg: EvalConfig, rows, summary, rankings) -> None:
    from dtm_ops.evaluation.plots import precision_plot, worst_sheet

    for name, data in (("per_query.csv", rows), ("summary.csv", summary)):
        with open(out / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0].keys()))
            w.writeheader()
            w.writerows(data)
    config = {k: v for k, v in cfg.__dict__.items() if k not in ("progress",)}
    head = (f"# {es.meta.get('name')}: {len(es.queries)} queries, {len(es.frames)} frames\n\n"
            f"Labels: {es.meta.get('labels')}\n\nConfig: `{json.dumps(config)}`\n\n")
    atomic_write(out / "summary.md", (head + markdown_table(summary)).encode())
    precision_plot(summary, cfg.methods, out / "precision_by_area.png", title=str(es.meta.get("name")))
    worst_sheet(es, rows, rankings, out / "worst.html")
