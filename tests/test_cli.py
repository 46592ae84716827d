"""The ``dtm`` command end to end on a small lake of real frames."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dtm_ops.boxes import box_iou

pytestmark = pytest.mark.slow

DTM = str(Path(sys.executable).parent / "dtm")


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([DTM, *args], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def lake(tmp_path_factory, bikes_frames):
    root = tmp_path_factory.mktemp("cli")
    folder = root / "lake" / "bikes"
    folder.mkdir(parents=True)
    for idx in list(range(0, 250, 10)) + [220]:
        bikes_frames[idx].save(folder / f"{idx:06d}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def features(lake):
    """``dtm extract`` run once; its output kept for the assertions."""
    feats = lake / "features"
    r = run("extract", str(lake / "lake"), "--features", str(feats), "--no-progress")
    assert r.returncode == 0, r.stderr
    return feats, r.stdout


def test_full_decode_keeps_adding_to_a_feature_set_from_before_reduced_decoding(lake, tmp_path):
    """A set indexed with ``--full-decode`` has the fingerprint of sets indexed before the
    option; the default extractor is refused there, and the flag adds to it."""
    from dtm_ops.store import FeatureStore

    feats = tmp_path / "features"
    r = run("extract", str(lake / "lake"), "--features", str(feats), "--full-decode", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert FeatureStore.open(str(feats)).manifest().fingerprint.preprocess == {"long_side": 640, "multiple": 32}
    refused = run("extract", str(lake / "lake"), "--features", str(feats), "--no-progress")
    assert refused.returncode != 0 and "another feature extractor" in refused.stderr
    assert "reduced_decode" in refused.stderr
    again = run("extract", str(lake / "lake"), "--features", str(feats), "--full-decode", "--no-progress")
    assert again.returncode == 0 and "indexed 0 new frames (25 already present)" in again.stdout


def test_extract_names_a_damaged_frame_indexes_the_rest_and_exits_1(lake, tmp_path):
    import shutil

    from dtm_ops.store import FeatureStore

    folder = tmp_path / "lake" / "cam"
    folder.mkdir(parents=True)
    for name in ("000000.jpg", "000010.jpg"):
        shutil.copy(lake / "lake" / "bikes" / name, folder / name)
    (folder / "000005.jpg").write_bytes(b"half an upload")
    r = run("extract", str(tmp_path / "lake"), "--features", str(tmp_path / "features"), "--no-progress")
    assert r.returncode == 1, r.stderr
    assert "indexed 2 new frames (0 already present)" in r.stdout
    assert (f"left out unreadable frame cam/000005: {folder / '000005.jpg'}: record cam/000005: field 'image': "
            "not a readable image (not an image, or of a format Pillow cannot read)") in r.stderr
    assert "1 unreadable frame(s) left out" in r.stderr and "Traceback" not in r.stderr
    assert FeatureStore.open(str(tmp_path / "features")).manifest().frame_ids() == {"cam/000000", "cam/000010"}


def test_help_explains_each_option():
    out = run("search", "--help")
    assert out.returncode == 0
    for opt in ("--features", "--image", "--box", "--queries", "--top-k", "--scales", "--mode", "--out"):
        assert opt in out.stdout


def test_extract_then_search_writes_results_heatmaps_and_sheet(lake, features):
    (feats, stdout), out = features, lake / "out"
    assert re.search(r"indexed 25 new frames \(0 already present\)", stdout)
    again = run("extract", str(lake / "lake"), "--features", str(feats), "--no-progress")
    assert "indexed 0 new frames (25 already present)" in again.stdout

    query = lake / "lake" / "bikes" / "000220.jpg"
    r = run("search", "--features", str(feats), "--image", str(query), "--box", "268,10,535,212",
            "--label", "bicycle", "--top-k", "5", "--out", str(out), "--no-progress", "--exclude-window", "-1")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [row["rank"] for row in rows] == [1, 2, 3, 4, 5]
    assert all(rows[i]["score"] >= rows[i + 1]["score"] for i in range(4))
    # With no exclusion the query frame itself is in the lake: it ranks first, in place.
    assert rows[0]["frame_id"] == "bikes/000220"
    assert box_iou(rows[0]["box"], (268, 10, 535, 212)) >= 0.7
    for row in rows:
        assert {"query_id", "frame_id", "rank", "score", "box", "scale"} <= set(row)
        with Image.open(out / row["heatmap"]) as overlay:  # the heat map over the whole frame, as PNG
            assert overlay.format == "PNG" and overlay.size == (640, 272)
    sheet = (out / "index.html").read_text()
    assert sheet.count("<figure>") == 5 and "bicycle" in sheet


def test_queries_file_with_two_boxes_all_mode(lake, features):
    qfile = lake / "q.jsonl"
    qfile.write_text(json.dumps({"id": "pair", "image": "lake/bikes/000220.jpg", "boxes": [[268, 10, 535, 212], [0, 0, 150, 200]], "mode": "all"}) + "\n")
    r = run("search", "--features", str(lake / "features"), "--queries", str(qfile), "--top-k", "3",
            "--out", str(lake / "out2"), "--no-heatmaps", "--no-progress")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (lake / "out2" / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(row["rois"]) == 2 for row in rows)
    # 'all' ranks by the weaker ROI
    assert all(row["score"] == pytest.approx(min(m["score"] for m in row["rois"])) for row in rows)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--box", "268,10,900,212"], "field 'boxes[0]': box (268.0, 10.0, 900.0, 212.0) lies outside the 640x272 image"),
        (["--box", "300,10,200,212"], "empty or inverted"),
        (["--box", "1,2,3"], "expected 'x1,y1,x2,y2'"),
        (["--box", "268,10,535,212", "--scales", "1,nan"], "argument --scales: expected positive numbers like 0.5,1,2, "
                                                           "got '1,nan'"),
    ],
)
def test_bad_boxes_exit_2_with_a_clear_message(lake, features, args, message):
    query = lake / "lake" / "bikes" / "000220.jpg"
    r = run("search", "--features", str(lake / "features"), "--image", str(query), *args, "--out", str(lake / "bad"))
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert not (lake / "bad" / "results.jsonl").exists()


def test_missing_image_and_missing_store(lake, features):
    r = run("search", "--features", str(lake / "features"), "--image", str(lake / "nope.jpg"), "--box", "0,0,5,5", "--out", str(lake / "x"))
    assert r.returncode == 2 and "nope.jpg: record query: field 'image': file not found" in r.stderr
    r = run("search", "--features", str(lake / "nostore"), "--image", "x.jpg", "--box", "0,0,5,5", "--out", str(lake / "x"))
    assert r.returncode == 2 and "no feature store here (no manifest); run 'dtm extract' first" in r.stderr


def test_gc_deletes_old_unnamed_shards_lists_them_in_a_dry_run_and_names_missing_ones(features, tmp_path):
    import os
    import shutil
    import time

    from dtm_ops.store import FeatureStore

    feats = tmp_path / "features"
    shutil.copytree(features[0], feats)
    (named,) = [p.name for p in (feats / "shards").iterdir()]
    old = time.time() - 25 * 3600
    orphan = feats / "shards" / "0123456789abcdef0123.safetensors"
    fresh = feats / "shards" / "fedcba98765432100123.safetensors"
    for p in (orphan, fresh):
        shutil.copy(feats / "shards" / named, p)
    os.utime(orphan, (old, old))
    (feats / "staging").mkdir()
    (feats / "staging" / "index-batch-1.json").write_text("[]")
    os.utime(feats / "staging" / "index-batch-1.json", (old, old))

    dry = run("gc", "--features", str(feats), "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[:2] == ["would delete shards/0123456789abcdef0123.safetensors",
                                          "would delete staging/index-batch-1.json"]
    summary = json.loads(dry.stdout.splitlines()[-1])
    assert (summary["deleted"], summary["kept_young"], summary["dry_run"]) == (2, 1, True)
    assert summary["deleted_bytes"] == orphan.stat().st_size + 2 and orphan.exists()

    done = run("gc", "--features", str(feats))
    assert done.returncode == 0 and "deleted shards/0123456789abcdef0123.safetensors" in done.stdout
    assert sorted(p.name for p in (feats / "shards").iterdir()) == sorted([named, fresh.name])
    assert not (feats / "staging" / "index-batch-1.json").exists()
    reader = FeatureStore.open(feats)
    assert reader.read_shard(reader.manifest().shards[0])[0].shape[0] == 25  # the lake's 25 frames

    (feats / "shards" / named).unlink()
    broken = run("gc", "--features", str(feats), "--grace-hours", "0")
    assert broken.returncode == 2 and json.loads(broken.stdout.splitlines()[-1])["deleted"] == 1
    assert f"dtm: error: {feats}: 1 shard(s) named by manifest version 1 are missing: shards/{named}" in broken.stderr
    assert not fresh.exists()  # with no grace, the young orphan goes too
