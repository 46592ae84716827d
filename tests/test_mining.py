"""The mining steps as plain functions, on a small real lake in several shards."""

from __future__ import annotations

import json

import pytest

from dtm_ops import mining
from dtm_ops.indexing import index_frames
from dtm_ops.media import list_frames
from dtm_ops.store import FeatureStore

pytestmark = pytest.mark.slow
BIKE = [268.0, 10.0, 535.0, 212.0]


@pytest.fixture(scope="module")
def lake(tmp_path_factory, bikes_frames, extractor):
    root = tmp_path_factory.mktemp("mining")
    folder = root / "lake" / "bikes"
    folder.mkdir(parents=True)
    for idx in range(0, 250, 8):
        bikes_frames[idx].save(folder / f"{idx:06d}.jpg", quality=95)
    store = FeatureStore.open(root / "features")
    index_frames(list_frames(root / "lake"), store, extractor, shard_frames=6)
    return root


def _report(root, rid, **kw):
    rec = {"schema": "dtm-report/1", "report_id": rid, "frame_uri": str(root / "lake/bikes/000216.jpg"),
           "error_type": "false_negative", "class": "bicycle", "boxes": [BIKE]}
    rec.update(kw)
    return json.dumps(rec)


def _run(tmp_path, root, lines, **cfg):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    run = mining.RunFolder(str(tmp_path / "run"))
    config = mining.MiningConfig(features_uri=str(root / "features"), top_k=cfg.pop("top_k", 5), **cfg)
    return run, config, mining.fetch_reports(run, str(tmp_path / "r.jsonl"))


def _mine(run, config, max_tasks):
    mining.validate_reports(run)
    t = mining.build_templates(run, config)
    groups = mining.plan_scan(config, max_tasks, t["manifest_version"])
    keys = [mining.scan_group(run, config, g) for g in groups]
    mining.merge_results(run, config, keys)
    return groups


def test_mixed_report_quarantines_bad_records_with_reasons_and_mines_the_rest(lake, tmp_path):
    lines = [
        _report(lake, "good"),
        "{not json",
        _report(lake, "outside", boxes=[[600, 100, 900, 200]]),
        _report(lake, "kind", error_type="false_alarm"),
        _report(lake, "gone", frame_uri=str(lake / "lake/bikes/missing.jpg")),
        _report(lake, "fp-score", error_type="false_positive", score=1.7),
    ]
    run, cfg, fetched = _run(tmp_path, lake, lines)
    assert fetched == {"reports": 5, "unparsable": 1, "files": 1, "already_mined": 0, "nothing_new": False}
    assert mining.validate_reports(run) == {"valid": 1, "quarantined": 5}
    reasons = {q["record"]["report_id"] if isinstance(q["record"], dict) else "json": q["reasons"]
               for q in run.get_lines("reports/quarantine.jsonl")}
    assert reasons["json"][0].startswith("not valid JSON")
    assert "field 'boxes[0]'" in reasons["outside"][0] and "outside the 640x272 image" in reasons["outside"][0]
    assert "field 'error_type': 'false_alarm' is not one of" in reasons["kind"][0]
    assert "field 'frame_uri': frame cannot be read" in reasons["gone"][0]
    assert "field 'score'" in reasons["fp-score"][0]
    _mine(run, cfg, 3)
    rows = run.get_lines("results.jsonl")
    assert {r["query_id"] for r in rows} == {"good"} and [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    # The failure frame (216) and its neighbours are not mined back as new data.
    assert all(abs(r["index"] - 216) > cfg.dedupe_window for r in rows)


def test_a_report_file_that_is_all_bad_fails_the_run(lake, tmp_path):
    run, _, _ = _run(tmp_path, lake, [_report(lake, "a", boxes=[[1, 1, 0, 0]]), "[1, 2]"])
    with pytest.raises(mining.ValidationFailed, match="every report was quarantined"):
        mining.validate_reports(run)


def test_scan_groups_are_bounded_and_results_do_not_depend_on_grouping(lake, tmp_path):
    shards = FeatureStore.open(lake / "features").manifest().shards
    assert len(shards) >= 4  # 32 frames, flushed per batch of 8
    results = {}
    for max_tasks in (1, 3, 100):
        run, cfg, _ = _run(tmp_path / str(max_tasks), lake, [_report(lake, "q")], dedupe_window=0)
        groups = _mine(run, cfg, max_tasks)
        assert len(groups) == min(max_tasks, len(shards))
        assert sorted(n for g in groups for n in g["shards"]) == sorted(s.name for s in shards)
        results[max_tasks] = [(r["frame_id"], round(r["score"], 6)) for r in run.get_lines("results.jsonl")]
    assert results[1] == results[3] == results[100]


def test_a_retried_scan_task_rewrites_the_same_partial(lake, tmp_path):
    run, cfg, _ = _run(tmp_path, lake, [_report(lake, "q")])
    mining.validate_reports(run)
    t = mining.build_templates(run, cfg)
    group = mining.plan_scan(cfg, 2, t["manifest_version"])[0]
    first = run.objects.get(mining.scan_group(run, cfg, group))
    assert run.objects.get(mining.scan_group(run, cfg, group)) == first


def test_failed_result_validation_blocks_the_push(lake, tmp_path):
    run, cfg, _ = _run(tmp_path, lake, [_report(lake, "q")])
    _mine(run, cfg, 2)
    rows = run.get_lines("results.jsonl")
    run.put_lines("results.jsonl", rows + [dict(rows[0], rank=99)])  # a duplicate row, rank past top_k
    with pytest.raises(mining.ValidationFailed, match="more than one row"):
        mining.validate_results(run, cfg)
    with pytest.raises(mining.ValidationFailed, match="nothing pushed"):
        mining.push(run, cfg, "manifest", str(tmp_path / "sink"), run_id="r", dry_run=False)
    assert not (tmp_path / "sink").exists()


def test_push_is_idempotent_and_dry_run_pushes_nothing(lake, tmp_path):
    run, cfg, _ = _run(tmp_path, lake, [_report(lake, "q")])
    _mine(run, cfg, 2)
    mining.validate_results(run, cfg)
    sink = tmp_path / "sink"
    dry = mining.push(run, cfg, "manifest", str(sink), run_id="r1", dry_run=True)
    assert dry["pushed"] == 0 and dry["would_push"] == 5 and not sink.exists()
    first = mining.push(run, cfg, "manifest", str(sink), run_id="r1", dry_run=False)
    again = mining.push(run, cfg, "manifest", str(sink), run_id="r2", dry_run=False)
    assert (first["pushed"], first["already"]) == (5, 0)
    assert (again["pushed"], again["already"]) == (0, 5)
    tasks = sorted((sink / "tasks").glob("*.json"))
    assert len(tasks) == 5
    task = json.loads(tasks[0].read_text())
    pred = task["predictions"][0]["result"][0]
    assert pred["type"] == "rectanglelabels" and pred["value"]["rectanglelabels"] == ["bicycle"]
    row = next(r for r in run.get_lines("results.jsonl") if r["frame_id"] == task["data"]["frame_id"])
    x1 = pred["value"]["x"] * pred["original_width"] / 100
    assert x1 == pytest.approx(row["box"][0], abs=1e-6)


def test_the_run_report_renders_the_other_hits_when_a_hit_frame_is_gone(lake, tmp_path, caplog):
    """A frame deleted from the lake (or damaged) since it was indexed: its hit keeps its row
    with no heat map, the sheet says why, and the other hits are drawn."""
    import logging
    from pathlib import Path

    run, cfg, _ = _run(tmp_path, lake, [_report(lake, "q")])
    _mine(run, cfg, 2)
    rows = run.get_lines("results.jsonl")
    gone = str(tmp_path / "deleted.jpg")
    rows[1] = dict(rows[1], source=gone)
    run.put_lines("results.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="dtm_ops.report"):
        mining.publish_report(run, cfg, {})
    report = Path(run.local_path()) / "report"
    written = [json.loads(line) for line in (report / "results.jsonl").read_text().splitlines()]
    assert [r["frame_id"] for r in written] == [r["frame_id"] for r in rows]
    assert [r["heatmap"] is None for r in written] == [False, True, False, False, False]
    assert [r.get("image_error") for r in written] == [None, f"{gone}: record {rows[1]['frame_id']}: field 'image': "
                                                             "file not found", None, None, None]
    assert all((report / r["heatmap"]).is_file() and (report / r["thumb"]).is_file() for r in written if r["heatmap"])
    sheet = (report / "index.html").read_text()
    assert f"frame unreadable: {gone}: record {rows[1]['frame_id']}: field &#x27;image&#x27;: file not found" in sheet
    assert sheet.count("<img src='heatmaps/") == 4
    assert [r.getMessage() for r in caplog.records if r.name == "dtm_ops.report"] == [
        f"no heat map for the hits on frame {rows[1]['frame_id']}: {gone}: record {rows[1]['frame_id']}: "
        "field 'image': file not found"]


def test_only_new_report_files_are_fetched_once_a_run_has_mined_them(lake, tmp_path):
    """A prefix where the detector drops a file a day: a run with ``only_new`` reads the files
    no finished run has mined (by their bytes), a changed file again, and says when there is
    nothing new; without ``only_new`` every file is read."""
    reports, mined = tmp_path / "reports", str(tmp_path / "mined")
    reports.mkdir()
    (reports / "day1.jsonl").write_text(_report(lake, "a") + "\n")
    (reports / "day2.jsonl").write_text(_report(lake, "b") + "\n")

    def fetch(name, only_new=True):
        run = mining.RunFolder(str(tmp_path / "runs" / name))
        out = mining.fetch_reports(run, str(reports), mined_uri=mined, only_new=only_new)
        ids = [r["report_id"] for r in run.get_lines("reports/raw.jsonl")] if not out["nothing_new"] else []
        return run, out, ids

    run1, out, ids = fetch("r1")
    assert ids == ["a", "b"] and (out["files"], out["already_mined"]) == (2, 0)
    assert [f["uri"].rsplit("/", 1)[1] for f in run1.get_json("reports/files.json")] == ["day1.jsonl", "day2.jsonl"]
    assert fetch("r2")[2] == ["a", "b"]  # r1 has not finished: nothing is recorded yet
    assert mining.mark_mined(run1, mined) == 2
    _, out, ids = fetch("r3")
    assert out == {"reports": 0, "unparsable": 0, "files": 0, "already_mined": 2, "nothing_new": True} and ids == []
    (reports / "day3.jsonl").write_text(_report(lake, "c") + "\n")
    (reports / "day1.jsonl").write_text(_report(lake, "a") + "\n" + _report(lake, "a2") + "\n")  # appended to
    _, out, ids = fetch("r4")
    assert ids == ["a", "a2", "c"] and (out["files"], out["already_mined"]) == (2, 1)
    assert fetch("r5", only_new=False)[2] == ["a", "a2", "b", "c"]
    adhoc = mining.adhoc_from_form(str(lake / "lake/bikes/000216.jpg"), ",".join(map(str, BIKE)), "bicycle")
    run6 = mining.RunFolder(str(tmp_path / "runs" / "r6"))
    mining.mark_mined(fetch("r4")[0], mined)
    out = mining.fetch_reports(run6, str(reports), adhoc, mined_uri=mined, only_new=True)
    assert out["nothing_new"] is False and [r["report_id"] for r in run6.get_lines("reports/raw.jsonl")] == ["adhoc"]


def test_a_pushed_run_records_its_report_files_as_mined_and_a_dry_run_does_not(lake, tmp_path):
    import hashlib

    mined = str(tmp_path / "mined")
    for name, dry_run in (("dry", True), ("real", False)):
        run, cfg, _ = _run(tmp_path / name, lake, [_report(lake, "q")])
        _mine(run, cfg, 2)
        mining.validate_results(run, cfg)
        out = mining.push(run, cfg, "manifest", str(tmp_path / "sink"), run_id=name, dry_run=dry_run, mined_uri=mined)
        marked = sorted(p.name for p in (tmp_path / "mined").glob("*.json")) if (tmp_path / "mined").exists() else []
        if dry_run:
            assert "report_files_marked" not in out and marked == []
        else:
            (f,) = run.get_json("reports/files.json")
            assert out["report_files_marked"] == 1 and marked == [f"{f['sha256']}.json"]
            record = json.loads((tmp_path / "mined" / marked[0]).read_text())
            assert record["uri"] == f["uri"] and record["run"] == run.uri
            assert f["sha256"] == hashlib.sha256((tmp_path / name / "r.jsonl").read_bytes()).hexdigest()
