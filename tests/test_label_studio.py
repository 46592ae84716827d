"""The Label Studio sink against a real Label Studio server (and the real S3 server for frames)."""

from __future__ import annotations

import base64
import uuid
from dataclasses import replace

import pytest

from dtm_ops.sinks import item_key, to_label_studio_task
from dtm_ops.sinks.label_studio import LabelingError, LabelStudioSink

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def frames_bucket(s3_server, bikes_frames):
    bucket = s3_server.bucket(f"ls-frames-{uuid.uuid4().hex[:6]}")
    s3_server.upload_frames(bucket, "bikes", bikes_frames, range(0, 250, 5))
    return bucket


def _tasks(bucket, indices, query="q1", label="bicycle"):
    out = []
    for rank, idx in enumerate(indices, 1):
        hit = {"query_id": query, "frame_id": f"bikes/{idx:06d}", "source": f"s3://{bucket}/bikes/{idx:06d}.jpg",
               "score": 10.0 - rank / 10, "rank": rank, "box": [10.5 + idx, 20.25, 200.0 + idx, 250.75], "label": label}
        out.append(to_label_studio_task(hit, run_id="run-1", model_version="fp123", width=640, height=272))
    return out


def _project(label_studio, s3_server, bucket, **kw) -> LabelStudioSink:
    """A fresh project, with the frames bucket connected as S3 source storage."""
    sink = LabelStudioSink(label_studio.config(project=f"test-{uuid.uuid4().hex[:8]}", **kw))
    pid = sink.project_id(["bicycle"])
    cfg = s3_server.config()
    label_studio.api("POST", "/api/storages/s3", json={
        "project": pid, "title": "frames", "bucket": bucket, "s3_endpoint": cfg.endpoint_url,
        "aws_access_key_id": cfg.access_key, "aws_secret_access_key": cfg.secret_key, "presign": True,
        "use_blob_urls": True, "region_name": cfg.region})
    return sink


def _server_tasks(label_studio, pid):
    return label_studio.api("GET", "/api/tasks", params={"project": pid, "page_size": 1000, "fields": "all"})["tasks"]


def test_push_and_read_back_boxes_in_pixels(label_studio, s3_server, frames_bucket):
    sink = _project(label_studio, s3_server, frames_bucket)
    tasks = _tasks(frames_bucket, [0, 5, 10, 220])
    result = sink.push(tasks)
    assert len(result.pushed) == 4 and result.skipped == []
    got = {t["data"]["dtm_key"]: t for t in _server_tasks(label_studio, sink.project_id())}
    assert set(got) == {t["data"]["dtm_key"] for t in tasks}
    for t in tasks:
        server = got[t["data"]["dtm_key"]]
        # Label Studio serves the s3:// URI through the connected storage: /tasks/N/resolve/?fileuri=<base64 URI>
        served = server["data"]["image"]
        assert "/resolve/?fileuri=" in served and server["data"]["run_id"] == "run-1"
        assert base64.b64decode(served.split("fileuri=")[1]).decode() == t["data"]["image"]
        (pred,) = server["predictions"]
        assert pred["model_version"] == "fp123"
        v = pred["result"][0]["value"]
        w, h = pred["result"][0]["original_width"], pred["result"][0]["original_height"]
        box = [v["x"] * w / 100, v["y"] * h / 100, (v["x"] + v["width"]) * w / 100, (v["y"] + v["height"]) * h / 100]
        idx = int(server["data"]["frame_id"].split("/")[1])
        assert box == pytest.approx([10.5 + idx, 20.25, 200.0 + idx, 250.75], abs=1e-6)
        assert v["rectanglelabels"] == ["bicycle"]
        # the push links each item to its task on the server
        assert result.links[t["data"]["dtm_key"]] == f"{label_studio.url}/projects/{sink.project_id()}/data?task={server['id']}"


def test_the_same_batch_again_and_an_overlapping_one_create_no_duplicates(label_studio, s3_server, frames_bucket):
    sink = _project(label_studio, s3_server, frames_bucket)
    first = _tasks(frames_bucket, range(0, 50, 5))
    assert len(sink.push(first).pushed) == 10
    again = sink.push(first)
    assert again.pushed == [] and len(again.skipped) == 10
    overlap = _tasks(frames_bucket, range(25, 100, 5))  # 5 old + 10 new
    result = sink.push(overlap)
    assert len(result.pushed) == 10 and len(result.skipped) == 5
    keys = [t["data"]["dtm_key"] for t in _server_tasks(label_studio, sink.project_id())]
    assert len(keys) == len(set(keys)) == 20


def test_a_push_cut_off_by_the_server_dying_resumes_exactly_once(label_studio, s3_server, frames_bucket):
    sink = _project(label_studio, s3_server, frames_bucket, chunk_size=4, max_attempts=2)
    tasks = _tasks(frames_bucket, range(0, 200, 5))  # 40 tasks, 10 chunks
    landed: list[str] = []

    def kill_after_two(chunk):
        landed.extend(chunk)
        if len(landed) == 8:
            label_studio.stop()

    try:
        with pytest.raises(LabelingError, match="failed after 2 attempts"):
            sink.push(tasks, on_chunk=kill_after_two)
    finally:
        label_studio.start()
    assert len(landed) == 8  # the ledger of what landed before the server died
    resumed = LabelStudioSink(sink.config).push(tasks)
    assert len(resumed.pushed) == 32 and set(resumed.skipped) == set(landed)
    keys = [t["data"]["dtm_key"] for t in _server_tasks(label_studio, sink.project_id())]
    assert sorted(keys) == sorted(item_key("q1", f"bikes/{i:06d}") for i in range(0, 200, 5))


def test_wrong_token_is_a_clear_error_without_the_token(label_studio):
    bad = "not-the-token-0123456789"
    sink = LabelStudioSink(replace(label_studio.config(project="x"), token=bad))
    with pytest.raises(LabelingError, match=r"rejected the API token \(401\)") as err:
        sink.project_id()
    assert bad not in str(err.value)
    assert bad not in repr(sink.config)


def test_frames_label_studio_cannot_resolve_are_refused_before_importing(label_studio, s3_server, frames_bucket):
    sink = _project(label_studio, s3_server, frames_bucket)
    tasks = _tasks(frames_bucket, [0]) + _tasks("unconnected-bucket", [5])
    with pytest.raises(LabelingError, match=r"frame 's3://unconnected-bucket/bikes/000005.jpg' cannot be resolved"):
        sink.push(tasks)
    local = _tasks(frames_bucket, [10])
    local[0]["data"]["image"] = "/data/frames/000010.jpg"
    with pytest.raises(LabelingError, match="is a local path"):
        sink.push(local)
    assert _server_tasks(label_studio, sink.project_id()) == []  # nothing half-imported


def test_presigned_frame_urls(label_studio, s3_server, frames_bucket):
    from dtm_ops.store.objects import set_default_s3_config

    set_default_s3_config(s3_server.config())
    try:
        sink = LabelStudioSink(label_studio.config(project=f"presign-{uuid.uuid4().hex[:6]}", frame_urls="presign"))
        sink.push(_tasks(frames_bucket, [0, 5]))
    finally:
        set_default_s3_config(None)
    (t, _) = _server_tasks(label_studio, sink.project_id())
    import urllib.request

    assert t["data"]["image"].startswith(s3_server.endpoint) and "Signature" in t["data"]["image"]
    assert t["data"]["frame_uri"].startswith("s3://")
    with urllib.request.urlopen(t["data"]["image"], timeout=10) as r:  # the URL really opens the frame
        assert r.read(3) == b"\xff\xd8\xff"
