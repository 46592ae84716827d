"""The results view's reading and rendering, without Airflow: a run folder written by hand."""

from __future__ import annotations

import re

import pytest

from dtm_ops.mining import RunFolder
from dtm_ops.sinks import item_key
from dtm_ops.store.objects import BadKey, check_key, open_objects
from dtm_ops.ui import pages
from dtm_ops.ui.results import BadRequest, NotFound, RunResults


def _hit(q: str, rank: int, frame: str) -> dict:
    return {"query_id": q, "frame_id": frame, "rank": rank, "score": 10.0 - rank, "cosine": 0.5, "box": [64.0, 27.2, 192.0, 136.0],
            "scale": 1.0, "roi_index": 0, "source": f"/lake/{frame}.jpg", "sequence": "cam", "index": rank * 10,
            "frame_scale": 1.0, "rois": [], "heatmap": f"heatmaps/{q}/{rank:04d}.png",
            "thumb": f"thumbs/heatmaps/{q}/{rank:04d}.jpg", "frame_size": [640, 272]}


@pytest.fixture
def run(tmp_path) -> RunFolder:
    run = RunFolder(str(tmp_path / "runs" / "dtm_mining" / "r1"))
    run.put_lines("reports/raw.jsonl", [{"report_id": "q1"}, {"report_id": "bad"}])
    run.put_lines("reports/valid.jsonl", [{"report_id": "q1", "class": "bicycle", "boxes": [[1, 2, 30, 40]],
                                           "frame_uri": "/lake/x.jpg", "error_type": "false_negative"}])
    run.put_lines("reports/quarantine.jsonl", [{"origin": "sample.jsonl:2", "reasons": ["boxes[0]: outside the image"]}])
    hits = [_hit("q1", r, f"f{r:03d}") for r in range(1, 31)]
    run.put_lines("results.jsonl", hits)
    run.put_lines("report/results.jsonl", hits)
    run.put_json("report/summary.json", {"hits": 30})
    run.put_json("validation/results.json", {"success": True, "problems": []})
    run.put_json("push/ledger.json", {"sink": "label_studio", "dry_run": False, "complete": True,
                                      "pushed": [item_key("q1", "f001")], "already": [item_key("q1", "f002")],
                                      "links": {item_key("q1", "f001"): "http://ls.example/projects/3/data?task=7"}})
    run.objects.put("report/thumbs/heatmaps/q1/0001.jpg", b"\xff\xd8jpeg")
    (tmp_path / "secret.txt").write_text("not for the web")
    return run


def test_overview_counts_what_the_run_wrote(run):
    o = RunResults(run).overview()
    assert o["reports"] == 2 and o["hits"] == 30 and [q["hits"] for q in o["queries"]] == [30]
    assert o["queries"][0]["best_score"] == 9.0
    assert o["quarantine"][0]["reasons"] == ["boxes[0]: outside the image"]
    html = pages.overview("/dtm/runs/dtm_mining/r1", "dtm_mining", "r1", o, [])
    assert "/dtm/runs/dtm_mining/r1/queries/q1" in html and "outside the image" in html


def test_query_pages_split_hits_in_rank_order_with_push_status(run):
    res = RunResults(run)
    p1, p3 = res.query("q1", 1, 12), res.query("q1", 3, 12)
    assert p1.pages == 3 and [h["rank"] for h in p1.hits] == list(range(1, 13))
    assert [h["rank"] for h in p3.hits] == list(range(25, 31))
    assert [h["push"] for h in p1.hits[:3]] == ["pushed", "already queued", "not pushed"]
    assert p1.hits[0]["link"] == "http://ls.example/projects/3/data?task=7"
    with pytest.raises(NotFound):
        res.query("q1", 4, 12)
    with pytest.raises(NotFound):
        res.query("nope")
    with pytest.raises(BadRequest):
        res.query("q1", 1, 0)


def test_query_page_places_the_box_in_percent_of_the_frame(run):
    html = pages.query_page("/b", "r1", RunResults(run).query("q1", 1, 2))
    # box [64, 27.2, 192, 136] on 640x272: left 10%, top 10%, width 20%, height 40%
    assert "left:10.000%;top:10.000%;width:20.000%;height:40.000%" in html
    assert len(re.findall(r"<figure class='hit'", html)) == 2
    assert "<a rel='next' href='/b/queries/q1?page=2'>" in html
    assert "href='http://ls.example/projects/3/data?task=7'" in html


def test_a_hit_whose_frame_could_not_be_read_says_so_instead_of_an_image(run):
    """``publish_report`` writes ``image_error`` for a hit frame deleted or damaged since it
    was indexed; a row with no image and no such field is one the report has not drawn yet."""
    rows = run.get_lines("report/results.jsonl")
    rows[0] = dict(rows[0], heatmap=None, thumb=None, image_error="/lake/f001.jpg: record f001: field 'image': <gone>")
    rows[1] = dict(rows[1], heatmap=None, thumb=None)
    run.put_lines("report/results.jsonl", rows)
    html = pages.query_page("/b", "r1", RunResults(run).query("q1", 1, 3))
    figures = re.findall(r"<figure class='hit'.*?</figure>", html, re.S)
    assert "<i>frame unreadable: /lake/f001.jpg: record f001: field &#x27;image&#x27;: &lt;gone&gt;</i>" in figures[0]
    assert "<i>image not rendered yet</i>" in figures[1] and "unreadable" not in figures[1]
    assert "<img class='thumb' src='/b/images/thumbs/heatmaps/q1/0003.jpg'" in figures[2]


@pytest.mark.parametrize("path", ["../secret.txt", "thumbs/../../secret.txt", "/etc/passwd", "heatmaps/q1/0001.txt",
                                  "results.jsonl", "thumbs/heatmaps/q1/0001.png", "heatmaps/../q1/0001.png",
                                  "heatmaps/q1/..%2f0001.png", "heatmaps/.hidden/0001.png"])
def test_image_paths_outside_the_report_are_refused(run, path):
    with pytest.raises(BadRequest):
        RunResults(run).image(path)


def test_image_served_from_the_report_and_missing_ones_are_404(run):
    assert RunResults(run).image("thumbs/heatmaps/q1/0001.jpg") == (b"\xff\xd8jpeg", "image/jpeg")
    with pytest.raises(NotFound):
        RunResults(run).image("thumbs/heatmaps/q1/0002.jpg")


def test_a_run_without_files_is_not_found(tmp_path):
    with pytest.raises(NotFound):
        RunResults(RunFolder(str(tmp_path / "none"))).overview()


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/abs", "a//b", "a\\b", "a/./b", "a\x00b"])
def test_object_keys_cannot_leave_the_store(tmp_path, key):
    with pytest.raises(BadKey):
        check_key(key)
    with pytest.raises(BadKey):
        open_objects(str(tmp_path)).get(key)


def test_values_from_run_files_are_escaped(run):
    run.put_lines("reports/valid.jsonl", [{"report_id": "<script>x</script>", "class": "<b>", "boxes": [], "frame_uri": "x"}])
    html = pages.overview("/b", "dtm_mining", "r1", RunResults(run).overview(), None)
    assert "<script>x" not in html and "&lt;script&gt;" in html
