"""The workflow through Airflow itself, against the real S3 server:

- ``airflow dags test`` of both DAGs, with a shard unreadable when the scan first reads it
  (as on a store whose writes show up late) and back before its retry;
- a real scheduler (``airflow standalone`` on 127.0.0.1): unpause and trigger dtm_mining
  through the REST API v2 with a token and a conf as the trigger form sends it.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import uuid

import pytest

from tests.airflow_server import BIKE, BIN, AirflowServer, put_report
from tests.airflow_server import airflow_cli as _airflow
from tests.airflow_server import get_object as _get
from tests.airflow_server import list_keys as _keys

pytestmark = pytest.mark.slow


def test_index_dag_filled_the_store_and_named_the_damaged_frame_it_left_out(world):
    from dtm_ops.store import FeatureStore

    store = FeatureStore.open(f"s3://{world['bucket']}/features", s3_config=world["server"].config())
    assert store.manifest().frame_count == 25 and "bikes/000255" not in store.manifest().frame_ids()
    out = world["index_output"]
    assert (f"left out unreadable frame bikes/000255 (s3://{world['bucket']}/lake/bikes/000255.jpg): not a readable "
            "image (not an image, or of a format Pillow cannot read)") in out, out[-3000:]
    assert re.search(r"""['"]unreadable['"]: 1[,}]""", out), out[-3000:]  # publish's summary


def _runs(world) -> set[str]:
    return {k.split("/")[2] for k in _keys(world, "runs/dtm_mining/")}


def test_dags_test_mines_reports_in_s3_quarantines_and_survives_a_failed_scan_try(world):
    put_report(world)
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

    # The run recorded its report file as mined, by the file's bytes, beside the run folders.
    digest = hashlib.sha256(_get(world, "reports/day1.jsonl")).hexdigest()
    marker = json.loads(_get(world, f"runs/mined_reports/{digest}.json"))
    assert marker["uri"] == f"s3://{world['bucket']}/reports/day1.jsonl" and marker["run"].endswith(base)

    # The same report again: a new run pushes nothing twice.
    _airflow(world["env"], "dags", "test", "dtm_mining", "-c",
             json.dumps({"report_uri": f"s3://{world['bucket']}/reports/", "top_k": 5}))
    assert len(_keys(world, "labeling/tasks/")) == 5

    # Asked for new report files only (what scheduled runs do): nothing is new, and the run
    # ends successful at fetch_reports, its other tasks skipped, no results written.
    before = _runs(world)
    out = _airflow(world["env"], "dags", "test", "dtm_mining", "-c",
                   json.dumps({"report_uri": f"s3://{world['bucket']}/reports/", "only_new_reports": True}))
    text = out.stdout + out.stderr
    assert "were mined before: nothing new to mine" in text, text[-3000:]
    assert "state=success" in text.split("DagRun Finished")[-1].split("\n")[0], text[-2000:]
    new = [k for r in _runs(world) - before for k in _keys(world, f"runs/dtm_mining/{r}/")]
    assert not any(k.endswith("/results.jsonl") for k in new), new


def test_real_scheduler_runs_a_form_triggered_mining_run(world):
    env = {**world["env"], "AIRFLOW__CORE__PARALLELISM": "4",
           "DTM_REPORTS_URI": f"s3://{world['bucket']}/no-reports-here"}  # a scheduled run finds nothing
    server = AirflowServer(env, world["home"] / "standalone.log", {"admin": ("admin", "e2e-password")}).start()
    try:
        server.wait_for_dag("dtm_mining", "admin")
        conf = {  # what the trigger form sends for an ad-hoc query
            "report_uri": None, "frame_uri": f"s3://{world['bucket']}/lake/bikes/000220.jpg",
            "boxes": ",".join(str(v) for v in BIKE), "class_name": "bicycle", "top_k": 3, "min_score": None,
            "scales": None, "mode": "any", "sink": "manifest", "dry_run": True,
        }
        run_id = f"e2e_{uuid.uuid4().hex[:8]}"
        server.trigger("dtm_mining", run_id, conf, "admin")
        run = server.wait_for_run("dtm_mining", run_id, "admin")
        assert run["state"] == "success", server.log_tail()
        scans = [t for t in server.task_instances("dtm_mining", run_id, "admin") if t["task_id"] == "scan"]
        assert scans and all(t["pool"] == "gpu" and t["queue"] == "gpu" and t["state"] == "success" for t in scans)
    finally:
        server.stop()
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
    put_report(world)
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


def test_gc_dag_deletes_unnamed_shards_and_staging_files_and_keeps_the_store_whole(world):
    """``dtm_store_gc`` with the form's values: a dry run deletes nothing; a run with no grace
    deletes a shard no manifest names and the index run's batch lists, and every named shard
    stays (the store still reads all 25 frames)."""
    from dtm_ops.store import FeatureStore

    shards, staged = set(_keys(world, "features/shards/")), _keys(world, "features/staging/")
    assert staged  # the index DAG's batch lists
    orphan = "features/shards/0123456789abcdef0123.safetensors"  # as a writer that died before its commit
    world["client"].put_object(Bucket=world["bucket"], Key=orphan, Body=_get(world, sorted(shards)[0]))

    dry = _airflow(world["env"], "dags", "test", "dtm_store_gc", "-c", json.dumps({"grace_hours": 0, "dry_run": True}))
    assert "would delete shards/0123456789abcdef0123.safetensors" in dry.stdout + dry.stderr
    assert set(_keys(world, "features/shards/")) == shards | {orphan} and _keys(world, "features/staging/") == staged

    _airflow(world["env"], "dags", "test", "dtm_store_gc", "-c", json.dumps({"grace_hours": 0, "dry_run": False}))
    assert set(_keys(world, "features/shards/")) == shards and _keys(world, "features/staging/") == []
    store = FeatureStore.open(f"s3://{world['bucket']}/features", s3_config=world["server"].config())
    assert sum(len(entry.frames) for entry, _, _ in store.iter_shards()) == 25
