"""The workflow through Airflow itself, against the real S3 server:

- ``airflow dags test`` of both DAGs, with a shard unreadable when the scan first reads it
  (as on a store whose writes show up late) and back before its retry;
- a real scheduler (``airflow standalone`` on 127.0.0.1): unpause and trigger dtm_mining
  through the REST API v2 with a token and a conf as the trigger form sends it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BIKE = [268.0, 10.0, 535.0, 212.0]


def _airflow(env, *args, timeout=900, check=True):
    r = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3_server, bikes_frames):
    """A bucket with the lake's frames and a report, and Airflow (SQLite) pointed at it."""
    home = tmp_path_factory.mktemp("airflow-e2e")
    bucket = s3_server.bucket(f"e2e-{uuid.uuid4().hex[:8]}")
    client = s3_server.config().client()
    s3_server.upload_frames(bucket, "lake/bikes", bikes_frames, range(0, 250, 10))
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
    _airflow(env, "db", "migrate")
    _airflow(env, "pools", "set", "gpu", "2", "GPU workers")
    _airflow(env, "dags", "test", "dtm_feature_index")
    return {"env": env, "bucket": bucket, "client": client, "home": home, "server": s3_server}


def _keys(world, prefix):
    pages = world["client"].get_paginator("list_objects_v2").paginate(Bucket=world["bucket"], Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def _get(world, key) -> bytes:
    return world["client"].get_object(Bucket=world["bucket"], Key=key)["Body"].read()


def test_index_dag_filled_the_store(world):
    from dtm_ops.store import FeatureStore

    store = FeatureStore.open(f"s3://{world['bucket']}/features", s3_config=world["server"].config())
    assert store.manifest().frame_count == 25


def _put_report(world) -> None:
    """One good report and one with a box outside its frame, in the bucket's reports/ prefix."""
    report = [
        {"schema": "dtm-report/1", "report_id": "bicycle-fn", "frame_uri": f"s3://{world['bucket']}/lake/bikes/000220.jpg",
         "error_type": "false_negative", "class": "bicycle", "boxes": [BIKE]},
        {"schema": "dtm-report/1", "report_id": "bad", "frame_uri": f"s3://{world['bucket']}/lake/bikes/000220.jpg",
         "error_type": "false_positive", "class": "bicycle", "boxes": [[600, 100, 900, 200]], "score": 0.4},
    ]
    world["client"].put_object(Bucket=world["bucket"], Key="reports/day1.jsonl",
                               Body="".join(json.dumps(r) + "\n" for r in report).encode())


def _runs(world) -> set[str]:
    return {k.split("/")[2] for k in _keys(world, "runs/dtm_mining/")}


def test_dags_test_mines_reports_in_s3_quarantines_and_survives_a_failed_scan_try(world):
    _put_report(world)
    before = _runs(world)
    log = world["home"] / "mining.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([str(BIN / "airflow"), "dags", "test", "dtm_mining", "-c",
                                 json.dumps({"report_uri": f"s3://{world['bucket']}/reports/", "top_k": 5})],
                                env=world["env"], stdout=out, stderr=subprocess.STDOUT)
    shard = sorted(k for k in _keys(world, "features/shards/"))[0]
    saved = _get(world, shard)
    try:
        deadline = time.time() + 600
        while not any(k.endswith("templates.safetensors") for k in _keys(world, "runs/")
                      if k.split("/")[2] not in before):  # this run's templates are built
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        world["client"].delete_object(Bucket=world["bucket"], Key=shard)
        while "named by the manifest is missing" not in log.read_text():  # a scan try failed on it
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
    finally:
        world["client"].put_object(Bucket=world["bucket"], Key=shard, Body=saved)
    assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "state=success" in text.split("DagRun Finished")[-1].split("\n")[0], text[-2000:]
    assert "up_for_retry" in text

    (run,) = _runs(world) - before
    base = f"runs/dtm_mining/{run}"
    rows = [json.loads(x) for x in _get(world, f"{base}/results.jsonl").decode().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5] and {r["query_id"] for r in rows} == {"bicycle-fn"}
    quarantine = [json.loads(x) for x in _get(world, f"{base}/reports/quarantine.jsonl").decode().splitlines()]
    assert [q["record"]["report_id"] for q in quarantine] == ["bad"]
    assert "outside the 640x272 image" in quarantine[0]["reasons"][0]
    assert f"{base}/report/index.html" in _keys(world, f"{base}/report/")
    assert len(_keys(world, "labeling/tasks/")) == 5
    ledger = json.loads(_get(world, f"{base}/push/ledger.json"))
    assert len(ledger["pushed"]) == 5

    # The same report again: a new run pushes nothing twice.
    _airflow(world["env"], "dags", "test", "dtm_mining", "-c",
             json.dumps({"report_uri": f"s3://{world['bucket']}/reports/", "top_k": 5}))
    assert len(_keys(world, "labeling/tasks/")) == 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(method, url, body=None, token=None):
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read() or b"null")


def test_real_scheduler_runs_a_form_triggered_mining_run(world):
    env = dict(world["env"])
    port = _free_port()
    airflow_home = Path(env["AIRFLOW_HOME"])
    (airflow_home / "passwords.json").write_text(json.dumps({"admin": "e2e-password"}))
    env.update({
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_home / "passwords.json"),
        "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        "DTM_REPORTS_URI": f"s3://{world['bucket']}/no-reports-here",  # a scheduled run finds nothing
    })
    base = f"http://127.0.0.1:{port}"
    log = open(world["home"] / "standalone.log", "w")
    proc = subprocess.Popen([str(BIN / "airflow"), "standalone"], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                _, health = _http("GET", f"{base}/api/v2/monitor/health")
                if health["metadatabase"]["status"] == "healthy" and health["scheduler"]["status"] == "healthy":
                    break
            except Exception:  # noqa: BLE001 - not up yet
                pass
            assert proc.poll() is None and time.time() < deadline, (world["home"] / "standalone.log").read_text()[-3000:]
            time.sleep(1)
        _, tok = _http("POST", f"{base}/auth/token", {"username": "admin", "password": "e2e-password"})
        token = tok["access_token"]
        while True:  # the DAG processor has parsed the DAG
            try:
                _http("GET", f"{base}/api/v2/dags/dtm_mining", token=token)
                break
            except urllib.error.HTTPError:
                assert time.time() < deadline
                time.sleep(1)
        _http("PATCH", f"{base}/api/v2/dags/dtm_mining", {"is_paused": False}, token=token)
        conf = {  # what the trigger form sends for an ad-hoc query
            "report_uri": None, "frame_uri": f"s3://{world['bucket']}/lake/bikes/000220.jpg",
            "boxes": ",".join(str(v) for v in BIKE), "class_name": "bicycle", "top_k": 3, "min_score": None,
            "scales": None, "mode": "any", "sink": "manifest", "dry_run": True,
        }
        run_id = f"e2e_{uuid.uuid4().hex[:8]}"
        _http("POST", f"{base}/api/v2/dags/dtm_mining/dagRuns", {"dag_run_id": run_id, "logical_date": None, "conf": conf},
              token=token)
        deadline = time.time() + 600
        while True:
            _, run = _http("GET", f"{base}/api/v2/dags/dtm_mining/dagRuns/{run_id}", token=token)
            if run["state"] in ("success", "failed"):
                break
            assert time.time() < deadline, (world["home"] / "standalone.log").read_text()[-3000:]
            time.sleep(2)
        assert run["state"] == "success", (world["home"] / "standalone.log").read_text()[-3000:]
        _, tis = _http("GET", f"{base}/api/v2/dags/dtm_mining/dagRuns/{run_id}/taskInstances?limit=100", token=token)
        scans = [t for t in tis["task_instances"] if t["task_id"] == "scan"]
        assert scans and all(t["pool"] == "gpu" and t["queue"] == "gpu" and t["state"] == "success" for t in scans)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    rows = [json.loads(x) for x in _get(world, f"runs/dtm_mining/{run_id}/results.jsonl").decode().splitlines()]
    assert [r["rank"] for r in rows] == [1, 2, 3] and {r["query_id"] for r in rows} == {"adhoc"}
    ledger = json.loads(_get(world, f"runs/dtm_mining/{run_id}/push/ledger.json"))
    assert ledger["dry_run"] is True and ledger["pushed"] == [] and len(ledger["would_push"]) == 3


def test_push_task_imports_into_label_studio_through_its_airflow_connection(world, label_studio):
    """The mining DAG's push task against the real Label Studio, configured by an Airflow
    connection (as AIRFLOW_CONN_LABEL_STUDIO_DEFAULT); a second run imports nothing twice."""
    project = f"dag-{uuid.uuid4().hex[:6]}"
    conn = {"conn_type": "http", "host": label_studio.url, "password": label_studio.token,
            "extra": {"project": project, "frame_urls": "presign", "chunk_size": 2}}
    env = {**world["env"], "AIRFLOW_CONN_LABEL_STUDIO_DEFAULT": json.dumps(conn)}
    _put_report(world)
    conf = json.dumps({"report_uri": f"s3://{world['bucket']}/reports/", "top_k": 4, "sink": "label_studio"})
    first = _airflow(env, "dags", "test", "dtm_mining", "-c", conf)
    (proj,) = [p for p in label_studio.api("GET", "/api/projects", params={"title": project})["results"] if p["title"] == project]
    tasks = label_studio.api("GET", "/api/tasks", params={"project": proj["id"], "page_size": 100, "fields": "all"})["tasks"]
    assert len(tasks) == 4 and all(t["data"]["query_id"] == "bicycle-fn" for t in tasks)
    assert all(t["predictions"][0]["result"][0]["value"]["rectanglelabels"] == ["bicycle"] for t in tasks)
    # dags test prints the tasks' logs; any log files count too. The token is in none of them.
    logs = [p.read_text(errors="replace") for p in (world["home"] / "airflow" / "logs").rglob("*") if p.is_file()]
    output = first.stdout + first.stderr
    assert "Label Studio project" in output  # the push task's own log lines are there
    assert not any(label_studio.token in text for text in [output, *logs])
    _airflow(env, "dags", "test", "dtm_mining", "-c", conf)
    again = label_studio.api("GET", "/api/tasks", params={"project": proj["id"], "page_size": 100, "fields": "all"})["tasks"]
    assert sorted(t["data"]["dtm_key"] for t in again) == sorted(t["data"]["dtm_key"] for t in tasks)
