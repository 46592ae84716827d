"""The mining workflow's steps, as plain functions (the Airflow DAG calls them; tests too).

Every step reads and writes a *run folder* (a local folder or ``s3://bucket/prefix``; see
:class:`RunFolder`) and returns small JSON-able values (counts, keys), never data. Steps
are idempotent: a retried or re-run step overwrites its own outputs with the same content.

    fetch_reports -> validate_reports -> build_templates -> plan_scan -> scan_group (mapped)
      -> merge_results -> validate_results -> push -> publish_report
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

from dtm_ops.errors import DtmError, InputError

log = logging.getLogger(__name__)


class ValidationFailed(DtmError):
    """A Great Expectations gate failed; the message lists what failed."""


class RunFolder:
    """Where one run's files live: ``<runs_uri>/<dag_id>/<run_id>/``."""

    def __init__(self, uri: str) -> None:
        from dtm_ops.store.objects import open_objects

        self.uri = uri.rstrip("/")
        self.objects = open_objects(self.uri)

    @classmethod
    def for_run(cls, runs_uri: str, dag_id: str, run_id: str) -> "RunFolder":
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", run_id)
        return cls(f"{runs_uri.rstrip('/')}/{dag_id}/{safe}")

    def put_json(self, key: str, obj) -> str:
        self.objects.put(key, json.dumps(obj, indent=1).encode())
        return key

    def get_json(self, key: str):
        return json.loads(self.objects.get(key))

    def put_lines(self, key: str, rows: Sequence[dict]) -> str:
        self.objects.put(key, "".join(json.dumps(r) + "\n" for r in rows).encode())
        return key

    def get_lines(self, key: str) -> list[dict]:
        return [json.loads(line) for line in self.objects.get(key).decode().splitlines() if line.strip()]

    def local_path(self) -> str | None:
        return None if self.uri.startswith("s3://") else self.uri


# ------------------------------------------------------------------------ reports in
def adhoc_report(frame_uri: str, boxes: Sequence, cls: str, report_id: str = "adhoc") -> dict:
    """A report for an ad-hoc query from the trigger form (a frame and one or more boxes)."""
    return {"schema": "dtm-report/1", "report_id": report_id, "frame_uri": frame_uri, "error_type": "false_negative",
            "class": cls, "boxes": [list(map(float, b)) for b in boxes], "detector": "manual", "tags": ["adhoc"]}


def adhoc_from_form(frame_uri: str | None, boxes: str | None, cls: str | None) -> dict | None:
    """The trigger form's ad-hoc query as a report (:func:`adhoc_report`), ``None`` where
    neither its frame nor its boxes are given. One without the other is an error naming the
    empty field, not a query silently left out; so is a box that is not four numbers. The
    form checks the boxes before the run starts, against the pattern checked here last
    (:data:`dtm_ops.settings.BOXES_PATTERN`)."""
    from dtm_ops.boxes import parse_box
    from dtm_ops.settings import BOXES_PATTERN

    frame_uri, boxes = (frame_uri or "").strip(), (boxes or "").strip()
    if not frame_uri and not boxes:
        return None
    if not boxes:
        raise InputError("an ad-hoc query needs boxes on its frame (x1,y1,x2,y2 in pixels; several separated by ';')",
                         source="trigger form", field="boxes")
    if not frame_uri:
        raise InputError(f"an ad-hoc query needs the frame its boxes {boxes!r} are on", source="trigger form",
                         field="frame_uri")
    parts = boxes.split(";")
    if len(parts) > 1 and not parts[-1].strip():
        parts.pop()  # one ';' may end the list
    parsed = [parse_box(b, source="trigger form", field=f"boxes[{i}]") for i, b in enumerate(parts)]
    if not re.search(BOXES_PATTERN, boxes):  # what float() takes beyond plain decimals: 1e2, nan
        raise InputError(f"expected x1,y1,x2,y2 in plain decimals, got {boxes!r}", source="trigger form", field="boxes")
    return adhoc_report(frame_uri, parsed, (cls or "").strip() or "object")


#: Run types that mine only the report files no finished run has mined: the daily schedule,
#: the ``dtm_reports`` Asset's updates, and backfills of them (Airflow's ``DagRunType``). A
#: run triggered by hand mines what its form names, unless the form asks otherwise.
ONLY_NEW_RUN_TYPES = frozenset({"scheduled", "asset_triggered", "backfill"})


def only_new_reports(run_type: object, asked: bool) -> bool:
    """Whether a run of ``run_type`` (Airflow's ``DagRunType``, or its value) mines only new
    report files: its type says so, or its form asked. The enum's value is compared: the
    enum itself neither prints nor hashes as its value."""
    return bool(asked) or getattr(run_type, "value", run_type) in ONLY_NEW_RUN_TYPES


def fetch_reports(
    run: RunFolder, source_uri: str | None, adhoc: dict | None = None, *, mined_uri: str | None = None,
    only_new: bool = False,
) -> dict:
    """Collect report lines from a file or a prefix of ``*.jsonl`` (local or S3), plus an
    optional ad-hoc report, into ``reports/raw.jsonl`` (each line with its origin), and the
    files read, with the SHA-256 of their bytes, into ``reports/files.json``.

    With ``only_new``, a file whose bytes a finished run has mined (:func:`mark_mined`
    records them under ``mined_uri``) is skipped: a daily run over a prefix where the
    detector adds a file a day mines that day's file, not the whole history again. A file
    that changed is mined again whole (the push skips what the sink holds already). The
    result says ``nothing_new`` where every file was skipped and there is no ad-hoc query.
    """
    import hashlib

    from dtm_ops.reports import parse_lines
    from dtm_ops.store.objects import open_objects

    lines: list[dict] = []
    quarantined = []
    read: list[dict] = []
    already: list[str] = []
    if source_uri:
        parent, _, name = source_uri.rstrip("/").rpartition("/")
        if source_uri.endswith(".jsonl"):
            files = [(open_objects(parent), name)]
        else:
            store = open_objects(source_uri)
            files = [(store, k) for k in sorted(store.list("")) if k.endswith(".jsonl")]
        if not files:
            raise InputError("no report files (*.jsonl) found", source=source_uri, field="report_uri")
        mined = set(open_objects(mined_uri).list("")) if only_new and mined_uri else set()
        for store, key in files:
            blob = store.get(key)
            uri, digest = f"{store.uri}/{key}", hashlib.sha256(blob).hexdigest()
            if _mined_key(digest) in mined:
                already.append(uri)
                continue
            read.append({"uri": uri, "sha256": digest})
            reports, bad = parse_lines(blob.decode(), uri)
            lines += [r.to_json() for r in reports]
            quarantined += [q.to_json() for q in bad]
        if already:
            log.info("%d report file(s) mined before, skipped: %s", len(already), ", ".join(already[:20]))
    if adhoc:
        lines.append({**adhoc, "origin": "trigger form"})
    if not lines and not quarantined:
        if already:
            return {"reports": 0, "unparsable": 0, "files": 0, "already_mined": len(already), "nothing_new": True}
        raise InputError("no reports to mine: give a report URI or an ad-hoc query", field="report_uri")
    run.put_lines("reports/raw.jsonl", lines)
    run.put_lines("reports/unparsable.jsonl", quarantined)
    run.put_json("reports/files.json", read)
    return {"reports": len(lines), "unparsable": len(quarantined), "files": len(read), "already_mined": len(already),
            "nothing_new": False}


def _mined_key(digest: str) -> str:
    return f"{digest}.json"


def mark_mined(run: RunFolder, mined_uri: str) -> int:
    """Record the report files this run read (``reports/files.json``) as mined, one object
    per file's SHA-256 under ``mined_uri`` (a put each, so runs side by side lose nothing).
    Called once the run's results are pushed; a run that fails before leaves its files to
    the next. Returns how many files were recorded."""
    from datetime import datetime, timezone

    from dtm_ops.store.objects import open_objects

    # a run whose reports were fetched by a version before this record has no such file
    files = run.get_json("reports/files.json") if run.objects.size("reports/files.json") is not None else []
    store = open_objects(mined_uri)
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for f in files:
        store.put(_mined_key(f["sha256"]), json.dumps({**f, "run": run.uri, "mined_at": when}).encode())
    return len(files)


def validate_reports(run: RunFolder) -> dict:
    """Great Expectations gate on the reports: good ones to ``reports/valid.jsonl``, the
    rest, each with its reasons, to ``reports/quarantine.jsonl``. All bad: the run fails."""
    from dtm_ops.reports import Report
    from dtm_ops.validation import validate_reports as gate

    raw = run.get_lines("reports/raw.jsonl")
    unparsable = run.get_lines("reports/unparsable.jsonl")
    good, bad = gate([Report.from_json(r) for r in raw])
    quarantine = unparsable + [q.to_json() for q in bad]
    run.put_lines("reports/valid.jsonl", [r.to_json() for r in good])
    run.put_lines("reports/quarantine.jsonl", quarantine)
    for q in quarantine:
        log.warning("quarantined %s: %s", q["origin"], "; ".join(q["reasons"]))
    if not good:
        raise ValidationFailed(
            f"every report was quarantined ({len(quarantine)}); see {run.uri}/reports/quarantine.jsonl: "
            + " | ".join(f"{q['origin']}: {'; '.join(q['reasons'])}" for q in quarantine[:5])
        )
    return {"valid": len(good), "quarantined": len(quarantine)}


# ------------------------------------------------------------------------ templates
@dataclass
class MiningConfig:
    features_uri: str
    top_k: int = 20
    min_score: float = float("-inf")
    scales: tuple[float, ...] | None = None
    mode: str = "any"
    margin: int = 0
    dedupe_window: int = 5  # frames of one sequence closer than this to a better hit are dropped
    device: str | None = None

    @classmethod
    def from_params(cls, features_uri: str, params: dict) -> "MiningConfig":
        from dtm_ops.scales import parse_scales

        scales = params.get("scales")
        if isinstance(scales, str):
            scales = parse_scales(scales, source="trigger form") if scales.strip() else None
        return cls(
            features_uri=features_uri,
            top_k=int(params.get("top_k", 20)),
            min_score=float(params["min_score"]) if params.get("min_score") not in (None, "") else float("-inf"),
            scales=tuple(scales) if scales else None,
            mode=params.get("mode", "any"),
            dedupe_window=int(params.get("dedupe_window", 5)),
        )


def _searcher(cfg: MiningConfig, store):
    from dtm_ops.indexing import extractor_for_store
    from dtm_ops.search import Searcher
    from dtm_ops.scales import DEFAULT_SCALES

    extractor = extractor_for_store(store, device=cfg.device)
    # The failure frame itself and its neighbours are not new data: frames of the query's own
    # sequence within dedupe_window are skipped here; near-duplicates among the hits are
    # suppressed at merge, across all shards (hence the wider per-shard top-k).
    return Searcher(extractor, scales=cfg.scales or DEFAULT_SCALES, margin=cfg.margin, top_k=cfg.top_k * 3,
                    exclude_window=cfg.dedupe_window)


def build_templates(run: RunFolder, cfg: MiningConfig) -> dict:
    """Crop every valid report's ROIs, extract and calibrate their templates once, and save
    them to ``templates.safetensors`` for the scan tasks."""
    from dtm_ops.search import Query
    from dtm_ops.store import FeatureStore
    from dtm_ops.search import save_prepared

    store = FeatureStore.open(cfg.features_uri)
    reports = run.get_lines("reports/valid.jsonl")
    queries = [
        Query(query_id=r["report_id"], source=r["frame_uri"], boxes=[tuple(b) for b in r["boxes"]],
              labels=[r["class"]] * len(r["boxes"]), mode=cfg.mode)
        for r in reports
    ]
    prepared = _searcher(cfg, store).prepare(queries, store)
    run.objects.put("templates.safetensors", save_prepared(prepared, store.manifest().fingerprint))
    return {"queries": len(prepared), "templates": sum(len(p.templates) for p in prepared),
            "manifest_version": store.manifest().version}


# ------------------------------------------------------------------------ scan
def group_shards(sizes: Sequence[int], max_groups: int) -> list[list[int]]:
    """Indices of shards in at most ``max_groups`` groups balanced by bytes (largest first
    into the lightest group): the number of mapped scan tasks stays bounded however many
    shards the lake has."""
    import heapq

    n = max(1, min(max_groups, len(sizes)))
    heap = [(0, i) for i in range(n)]  # (load, group)
    groups: list[list[int]] = [[] for _ in range(n)]
    for k in sorted(range(len(sizes)), key=lambda k: -sizes[k]):
        load, i = heapq.heappop(heap)
        groups[i].append(k)
        heapq.heappush(heap, (load + sizes[k], i))
    return [g for g in groups if g]


def plan_scan(cfg: MiningConfig, max_tasks: int, manifest_version: int | None = None) -> list[dict]:
    """Groups of shards, balanced by bytes, at most ``max_tasks`` of them however large the
    lake: the mapped scan runs one task per group."""
    from dtm_ops.store import FeatureStore

    manifest = FeatureStore.open(cfg.features_uri).manifest(manifest_version)
    shards = manifest.shards
    groups = group_shards([s.bytes for s in shards], max_tasks)
    return [{"group": i, "shards": sorted(shards[k].name for k in g), "manifest_version": manifest.version}
            for i, g in enumerate(groups)]


def scan_group(run: RunFolder, cfg: MiningConfig, group: dict) -> str:
    """Scan one group of shards for every query at once; write its partial top-k to
    ``partials/<group>.json`` (overwritten by a retry) and return that key."""
    from dtm_ops.store import FeatureStore
    from dtm_ops.search import load_prepared

    store = FeatureStore.open(cfg.features_uri)
    manifest = store.manifest(group["manifest_version"])
    prepared = load_prepared(run.objects.get("templates.safetensors"), manifest.fingerprint)
    names = set(group["shards"])
    shards = [s for s in manifest.shards if s.name in names]
    heaps = _searcher(cfg, store).scan(store, prepared, shards)
    partial = {qid: [h.to_record() for _, _, h in heap.items()] for qid, heap in heaps.items()}
    return run.put_json(f"partials/{group['group']:05d}.json", partial)


def merge_results(run: RunFolder, cfg: MiningConfig, partial_keys: Sequence[str]) -> dict:
    """Merge partial top-k lists into ``results.jsonl``: best first, ties by frame id, near
    duplicates (same sequence, within ``dedupe_window`` frames of a better hit) dropped,
    hits below ``min_score`` dropped, ``top_k`` per query."""
    merged: dict[str, list[dict]] = {}
    for key in sorted(partial_keys):
        for qid, hits in run.get_json(key).items():
            merged.setdefault(qid, []).extend(hits)
    rows = []
    for qid in sorted(merged):
        kept: list[dict] = []
        for h in sorted(merged[qid], key=lambda h: (-h["score"], h["frame_id"])):
            if h["score"] < cfg.min_score:
                break
            if any(k["sequence"] == h["sequence"] and abs(k["index"] - h["index"]) <= cfg.dedupe_window for k in kept):
                continue
            kept.append(h)
            if len(kept) == cfg.top_k:
                break
        for rank, h in enumerate(kept, 1):
            rows.append({**h, "rank": rank})
    run.put_lines("results.jsonl", rows)
    return {"hits": len(rows), "queries": len(merged)}


def validate_results(run: RunFolder, cfg: MiningConfig) -> dict:
    """Great Expectations gate on the results; a failure blocks the push."""
    from dtm_ops.store import FeatureStore
    from dtm_ops.validation import validate_results as gate

    rows = run.get_lines("results.jsonl")
    manifest = FeatureStore.open(cfg.features_uri).manifest()
    sizes = {f.frame_id: (f.width, f.height) for s in manifest.shards for f in s.frames}
    problems = gate(rows, sizes, cfg.top_k) if rows else []
    run.put_json("validation/results.json", {"success": not problems, "problems": problems})
    if problems:
        raise ValidationFailed(f"results failed validation ({len(problems)} problems), nothing pushed: " + "; ".join(problems[:10]))
    return {"rows": len(rows)}


# ------------------------------------------------------------------------ report
def publish_report(run: RunFolder, cfg: MiningConfig, summary: dict) -> dict:
    """``report/index.html`` (hits with heat maps and boxes, one section per query) and
    ``report/summary.json`` next to the results. Heat maps are recomputed for the hits only."""
    import tempfile
    from pathlib import Path

    from dtm_ops.report import write_results
    from dtm_ops.search import Hit, Query, RoiMatch
    from dtm_ops.store import FeatureStore
    from dtm_ops.search import load_prepared

    store = FeatureStore.open(cfg.features_uri)
    prepared = load_prepared(run.objects.get("templates.safetensors"), store.manifest().fingerprint)
    rows = run.get_lines("results.jsonl")
    results: dict[str, list[Hit]] = {p.query.query_id: [] for p in prepared}
    for r in rows:
        rois = [RoiMatch(**m) for m in r.pop("rois")]
        r.pop("heatmap", None)
        results[r["query_id"]].append(Hit(**r, rois=rois))
    searcher = _searcher(cfg, store)
    searcher.attach_heatmaps(store, prepared, results)
    queries: list[Query] = [p.query for p in prepared]
    full = {**summary, "run": run.uri, "hits": len(rows), "queries": len(queries)}
    local = run.local_path()
    out = Path(local) / "report" if local else Path(tempfile.mkdtemp(prefix="dtm-report-"))
    write_results(out, queries, results, stride=searcher.extractor.stride, title=f"dtm mining run {run.uri}")
    (out / "summary.json").write_text(json.dumps(full, indent=1))
    if not local:  # upload the rendered report next to the results
        for p in sorted(out.rglob("*")):
            if p.is_file():
                run.objects.put(f"report/{p.relative_to(out).as_posix()}", p.read_bytes())
    return {"report": f"{run.uri}/report/index.html", "summary": f"{run.uri}/report/summary.json", **full}


# ------------------------------------------------------------------------ push
def push(
    run: RunFolder, cfg: MiningConfig, sink_name: str, sink_uri: str | None, *, run_id: str, dry_run: bool,
    label_studio=None, mined_uri: str | None = None,
) -> dict:
    """Push the validated results to the labeling sink, idempotently.

    Each item's key comes from its report and frame; the sink is asked which keys it holds
    already, and ``push/ledger.json`` records every key pushed (updated after every chunk
    that lands) or found, so a retried or re-run push sends each item once, and a push
    cut off midway leaves a ledger of what did land. Once all landed (not in a dry run),
    the run's report files are recorded as mined under ``mined_uri`` (:func:`mark_mined`).
    """
    from dtm_ops.sinks import item_key, open_sink, to_label_studio_task
    from dtm_ops.store import FeatureStore

    if not run.get_json("validation/results.json")["success"]:
        raise ValidationFailed("results did not pass validation; nothing pushed")
    rows = run.get_lines("results.jsonl")
    manifest = FeatureStore.open(cfg.features_uri).manifest()
    sizes = {f.frame_id: (f.width, f.height) for s in manifest.shards for f in s.frames}
    labels = {r["report_id"]: r["class"] for r in run.get_lines("reports/valid.jsonl")}
    tasks = [
        to_label_studio_task({**h, "label": labels.get(h["query_id"])}, run_id=run_id,
                             model_version=manifest.fingerprint.id, width=sizes[h["frame_id"]][0], height=sizes[h["frame_id"]][1])
        for h in rows
    ]
    keys = [item_key(h["query_id"], h["frame_id"]) for h in rows]
    sink = None if dry_run else open_sink(sink_name, sink_uri, label_studio)
    if sink is None:
        ledger = {"sink": "none" if dry_run else sink_name, "dry_run": dry_run, "would_push": keys, "pushed": [], "already": []}
    else:
        ledger = {"sink": sink_name, "dry_run": False, "pushed": [], "already": [], "complete": False}

        def landed(chunk: list[str]) -> None:
            ledger["pushed"] += chunk
            run.put_json("push/ledger.json", ledger)

        result = sink.push(tasks, on_chunk=landed)
        ledger.update(pushed=result.pushed, already=result.skipped, links=result.links, complete=True)
    run.put_json("push/ledger.json", ledger)
    out = {k: (len(v) if isinstance(v, (list, dict)) else v) for k, v in ledger.items()}
    if mined_uri and not dry_run:
        out["report_files_marked"] = mark_mined(run, mined_uri)
    return out
