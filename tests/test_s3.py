"""S3 paths against a real S3 server (Ceph RGW on 127.0.0.1): indexing frames that live in
S3, searching a store in S3, the server going away mid-read, and bad credentials; and a
body cut off mid-stream (against a loopback HTTP server that does it)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from dtm_ops.errors import FeatureStoreError
from dtm_ops.search import Query, Searcher
from dtm_ops.store import FeatureStore
from tests.conftest import S3Server
from tests.test_store import FP, _frames

DTM = str(Path(sys.executable).parent / "dtm")


@pytest.mark.slow
def test_cli_indexes_frames_in_s3_and_search_equals_a_local_store(s3_server, s3_bucket, bikes_frames, tmp_path):
    indices = list(range(0, 250, 25)) + [220]
    s3_server.upload_frames(s3_bucket, "frames/bikes", bikes_frames, indices)
    env = {**os.environ, **s3_server.env}
    feats = f"s3://{s3_bucket}/features"
    r = subprocess.run([DTM, "extract", f"s3://{s3_bucket}/frames/", "--features", feats, "--no-progress"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "indexed 11 new frames" in r.stdout
    again = subprocess.run([DTM, "extract", f"s3://{s3_bucket}/frames/", "--features", feats, "--no-progress"],
                           env=env, capture_output=True, text=True, timeout=600)
    assert "indexed 0 new frames (11 already present)" in again.stdout

    query = f"s3://{s3_bucket}/frames/bikes/000220.jpg"
    out = tmp_path / "out"
    r = subprocess.run([DTM, "search", "--features", feats, "--image", query, "--box", "268,10,535,212",
                        "--top-k", "4", "--out", str(out), "--no-progress", "--exclude-window", "-1"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert rows[0]["frame_id"] == "bikes/000220" and rows[0]["source"] == query
    assert all((out / row["heatmap"]).is_file() for row in rows)

    # The same frames indexed into a local folder rank the same way.
    local_frames = tmp_path / "frames" / "bikes"
    local_frames.mkdir(parents=True)
    for idx in indices:
        (local_frames / f"{idx:06d}.jpg").write_bytes(s3_server.config().client().get_object(
            Bucket=s3_bucket, Key=f"frames/bikes/{idx:06d}.jpg")["Body"].read())
    r = subprocess.run([DTM, "extract", str(tmp_path / "frames"), "--features", str(tmp_path / "lf"), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([DTM, "search", "--features", str(tmp_path / "lf"), "--image", str(local_frames / "000220.jpg"),
                        "--box", "268,10,535,212", "--top-k", "4", "--out", str(tmp_path / "lout"), "--no-heatmaps",
                        "--no-progress", "--exclude-window", "-1"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    local = [json.loads(line) for line in (tmp_path / "lout" / "results.jsonl").read_text().splitlines()]
    assert [(x["frame_id"], round(x["score"], 4)) for x in local] == [(x["frame_id"], round(x["score"], 4)) for x in rows]


@pytest.fixture
def doomed_server(tmp_path):
    """A server of its own, for a test that kills it."""
    server = S3Server(tmp_path / "doomed")
    yield server
    server.stop()


def test_server_going_away_mid_read_fails_clearly_and_reports_nothing(doomed_server, random_extractor, tmp_path):
    bucket = doomed_server.bucket("doomed")
    cfg = doomed_server.config(max_attempts=2, connect_timeout=1.0, read_timeout=2.0)
    store = FeatureStore.open(f"s3://{bucket}/f", s3_config=cfg, prefetch_bytes=1, workers=1)
    for i in range(6):
        store.append(FP, *_frames(2, (3, 3 + i), prefix=f"s{i}"))
    stream = store.iter_shards()
    first = next(stream)
    assert first[0].name == store.manifest().shards[0].name
    pid = int((doomed_server.folder / "run" / "client.rgw.a.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(FeatureStoreError, match=r"shards/.*failed after 2 attempts"):
        for _ in stream:
            pass

    # A search over a store whose server is gone raises: no partial result is returned.
    searcher = Searcher(random_extractor, top_k=3)
    image = tmp_path / "q.jpg"
    __import__("PIL.Image").Image.new("RGB", (96, 64), (200, 10, 10)).save(image)
    with pytest.raises(FeatureStoreError):
        searcher.search(store, [Query("q", str(image), [(0, 0, 40, 40)])])


def test_wrong_credentials_are_a_clear_error_without_the_secret(s3_server, s3_bucket):
    secret = "not-the-right-secret-0123456789"
    cfg = replace(s3_server.config(), secret_key=secret, max_attempts=1)
    assert secret not in repr(cfg)
    store = FeatureStore.open(f"s3://{s3_bucket}/f", s3_config=cfg)
    with pytest.raises(FeatureStoreError, match="access denied") as err:
        store.append(FP, *_frames(1))
    assert secret not in str(err.value)


def test_missing_bucket_is_named(s3_server):
    store = FeatureStore.open("s3://no-such-bucket-dtm/f", s3_config=s3_server.config(max_attempts=1))
    with pytest.raises(FeatureStoreError, match="bucket 'no-such-bucket-dtm' does not exist"):
        store.append(FP, *_frames(1))


def test_a_body_cut_off_mid_stream_is_fetched_again(tmp_path):
    """Ranged reads go straight from the socket into the buffer, under urllib3's own checks:
    a server that closes the connection halfway through a body gets asked again, and the
    buffer ends up whole. (A loopback HTTP server that cuts its first answer: Ceph cannot be
    made to.)"""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from dtm_ops.store.objects import S3Config, S3ObjectStore

    data = bytes(range(256)) * 64
    requests = []

    class CutFirst(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - the http.server interface
            first, last = map(int, self.headers["Range"].removeprefix("bytes=").split("-"))
            body = data[first : last + 1]
            requests.append((self.path, first, last))
            self.send_response(206)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Range", f"bytes {first}-{last}/{len(data)}")
            self.end_headers()
            if len(requests) == 1:
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), CutFirst)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = S3Config(endpoint_url=f"http://127.0.0.1:{server.server_port}", region="us-east-1",
                       access_key="k", secret_key="s", max_attempts=3, read_timeout=5.0)
        objects = S3ObjectStore("bucket", "p", cfg)
        out = bytearray(3000)
        objects.read_into("blob", memoryview(out), 1000)
        assert bytes(out) == data[1000:4000]
        assert [r[1:] for r in requests] == [(1000, 3999), (1000, 3999)]
        assert requests[0][0].endswith("/bucket/p/blob")
    finally:
        server.shutdown()


def test_a_body_without_the_http_layer_underneath_is_read_by_copy():
    """Where botocore's body is not urllib3 over http.client (another transport), the ranged
    read falls back to ``read()`` and a copy; a length that is not the one asked for is
    refused, not retried."""
    import io

    from botocore.response import StreamingBody

    from dtm_ops.store.objects import _read_body_into

    data = bytes(range(200))
    out = bytearray(100)
    _read_body_into({"ContentLength": 100, "Body": StreamingBody(io.BytesIO(data[50:150]), 100)},
                    memoryview(out), "s3://b/p: blob", 50)
    assert bytes(out) == data[50:150]
    with pytest.raises(FeatureStoreError, match=r"s3://b/p: blob: GET of 100 bytes from byte 50 answered 200"):
        _read_body_into({"ContentLength": 200, "Body": StreamingBody(io.BytesIO(data), 200)},
                        memoryview(out), "s3://b/p: blob", 50)
