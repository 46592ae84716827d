"""The workflow on Airflow's CeleryExecutor across processes, on loopback: PostgreSQL and
Redis from Debian's packages, an API server, scheduler, DAG processor, triggerer, a CPU
worker (queue "default") and a GPU worker (queue "gpu") started by
scripts/loopback-cluster.sh, against the real S3 server.

- the scan tasks run on the gpu worker and the others on the cpu worker (the task
  instances' records), and the results equal a single-machine run's;
- the gpu worker killed in the middle of a scan: the scan is retried on a restarted worker,
  the run ends with the same results and no push is made twice.

Figures (wall times, queue-to-start latency of the mapped scan tasks) are written to
test-artifacts/distributed.json.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from tests.airflow_server import REPO, AirflowClient, airflow_cli, get_object, list_keys, put_report

pytestmark = pytest.mark.slow
SCRIPT = REPO / "scripts" / "loopback-cluster.sh"
ARTIFACTS = Path(os.environ.get("DTM_TEST_ARTIFACTS", REPO / "test-artifacts"))
TOP_K = 5


def _script(*args: str, env: dict, timeout: float = 300) -> None:
    r = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"loopback-cluster.sh {' '.join(args)}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"


class Cluster(AirflowClient):
    """The loopback cluster's REST API (as admin), its logs and its workers."""

    def __init__(self, folder: Path, env: dict) -> None:
        settings = {}
        for line in (folder / "env").read_text().splitlines():
            k, _, v = line.removeprefix("export ").partition("=")
            settings[k] = v
        super().__init__(settings["AIRFLOW__API__BASE_URL"], {"admin": ("admin", "admin")})
        self.folder, self.env = folder, env

    def log(self, name: str, tail: int | None = 3000) -> str:
        p = self.folder / "logs" / f"{name}.log"
        text = p.read_text(errors="replace") if p.exists() else ""
        return text[-tail:] if tail else text

    def log_tail(self, n: int = 3000) -> str:
        return self.log("scheduler", tail=n)

    def wait_ready(self, timeout: float = 300) -> None:
        """Scheduler and DAG processor healthy, the DAG parsed, both workers ready."""
        deadline = time.time() + timeout
        while True:
            logs = {w: self.log(f"worker-{w}", tail=None) for w in ("cpu", "gpu")}
            try:
                _, health = self.api("GET", "/api/v2/monitor/health")
                up = health["scheduler"]["status"] == "healthy" and health["dag_processor"]["status"] == "healthy"
                self.api("GET", "/api/v2/dags/dtm_mining", token=self.token("admin"))
            except Exception:  # noqa: BLE001 - not up yet
                up = False
            if up and all(f"{w}@" in text and "ready." in text for w, text in logs.items()):
                return
            tails = {w: t[-3000:] for w, t in logs.items()}
            assert time.time() < deadline, f"cluster not ready:\n{tails}\n{self.log('scheduler')}"
            time.sleep(2)

    def wait_worker(self, name: str, timeout: float = 120) -> None:
        """A (re)started worker's fresh log says it is ready."""
        deadline = time.time() + timeout
        while "ready." not in self.log(f"worker-{name}", tail=None):
            assert time.time() < deadline, self.log(f"worker-{name}")
            time.sleep(1)

    def tis(self, run_id: str) -> list[dict]:
        return self.task_instances("dtm_mining", run_id, "admin")


@pytest.fixture(scope="module")
def cluster(world):
    if shutil.which("redis-server") is None and os.geteuid() == 0:
        _script("install", env=os.environ.copy(), timeout=600)
    # PostgreSQL runs as its own user: its folder must be reachable, so not under pytest's 0700 tree
    folder = Path(tempfile.mkdtemp(prefix="dtm-cluster-", dir="/tmp"))
    folder.chmod(0o755)
    env = {**world["env"], "DTM_SINK_URI": f"s3://{world['bucket']}/labeling-dist",
           "DTM_REPORTS_URI": f"s3://{world['bucket']}/no-reports-here"}  # scheduled runs find nothing
    for k in [k for k in env if k.startswith("AIRFLOW__")]:
        env.pop(k)  # the cluster's own settings (DTM_* and S3 credentials stay)
    env.pop("AIRFLOW_HOME")
    put_report(world)
    try:
        _script("start", str(folder), env=env)
        c = Cluster(folder, env)
        c.wait_ready()
        yield c
    finally:
        _script("stop", str(folder), env=env)
        shutil.rmtree(folder, ignore_errors=True)


def _rows(world, run_id: str) -> list[tuple]:
    rows = [json.loads(x) for x in get_object(world, f"runs/dtm_mining/{run_id}/results.jsonl").splitlines()]
    return [(r["query_id"], r["rank"], r["frame_id"], round(r["score"], 4), [round(v, 1) for v in r["box"]]) for r in rows]


CONF = {"top_k": TOP_K}  # and report_uri: the bucket's day1.jsonl


@pytest.fixture(scope="module")
def reference(world):
    """The same mining on one machine (``airflow dags test``, SQLite): rows and wall time."""
    conf = {**CONF, "report_uri": f"s3://{world['bucket']}/reports/day1.jsonl", "sink": "none"}
    before = {k.split("/")[2] for k in list_keys(world, "runs/dtm_mining/")}
    t0 = time.time()
    airflow_cli(world["env"], "dags", "test", "dtm_mining", "-c", json.dumps(conf))
    seconds = time.time() - t0
    (run,) = {k.split("/")[2] for k in list_keys(world, "runs/dtm_mining/")} - before
    return {"rows": _rows(world, run), "seconds": seconds}


def _record(**figures) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / "distributed.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(figures)
    path.write_text(json.dumps(data, indent=1))


def _seconds(a: str | None, b: str | None) -> float | None:
    from datetime import datetime

    if not a or not b:
        return None
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def test_scans_run_on_the_gpu_worker_and_results_equal_one_machine(cluster, world, reference):
    run_id = f"dist_{uuid.uuid4().hex[:6]}"
    conf = {**CONF, "report_uri": f"s3://{world['bucket']}/reports/day1.jsonl"}
    cluster.trigger("dtm_mining", run_id, conf, "admin")
    run = cluster.wait_for_run("dtm_mining", run_id, "admin", timeout=900)
    assert run["state"] == "success", cluster.log("scheduler")
    tis = cluster.tis(run_id)
    scans = [t for t in tis if t["task_id"] == "scan"]
    others = [t for t in tis if t["task_id"] != "scan"]
    assert scans and all(t["hostname"] == "gpu-worker" and t["queue"] == "gpu" for t in scans), scans
    assert others and all(t["hostname"] == "cpu-worker" and t["queue"] == "default" for t in others), others
    assert _rows(world, run_id) == reference["rows"]
    assert len(list_keys(world, "labeling-dist/tasks/")) == TOP_K
    latency = [_seconds(t["queued_when"], t["start_date"]) for t in scans]
    _record(single_machine_dags_test_s=round(reference["seconds"], 1),
            distributed_run_s=round(_seconds(run["start_date"], run["end_date"]), 1),
            scan_tasks=len(scans), scan_queue_to_start_s=[round(v, 2) for v in latency if v is not None],
            scan_task_duration_s=[round(t["duration"], 2) for t in scans])


def test_a_gpu_worker_killed_mid_scan_is_retried_and_nothing_is_pushed_twice(cluster, world, reference):
    run_id = f"kill_{uuid.uuid4().hex[:6]}"
    cluster.trigger("dtm_mining", run_id, {**CONF, "report_uri": f"s3://{world['bucket']}/reports/day1.jsonl"}, "admin")
    deadline = time.time() + 600
    while not any(t["task_id"] == "scan" and t["state"] == "running" for t in cluster.tis(run_id)):
        assert time.time() < deadline, cluster.log("scheduler")
        time.sleep(0.2)
    killed_at = time.time()
    session = (cluster.folder / "pids" / "worker-gpu").read_text().strip()
    _script("kill-worker", str(cluster.folder), "gpu", env=cluster.env)
    # a lost machine loses its task processes too (Airflow gives each a process group of its own)
    left = subprocess.run(["pgrep", "-s", session], capture_output=True, text=True).stdout.split()
    assert not left, f"processes of the killed worker still run: {left}"
    time.sleep(2)
    _script("start-worker", str(cluster.folder), "gpu", env=cluster.env)  # a fresh log: "ready." once up
    cluster.wait_worker("gpu")
    run = cluster.wait_for_run("dtm_mining", run_id, "admin", timeout=900)
    assert run["state"] == "success", cluster.log("scheduler")
    scans = [t for t in cluster.tis(run_id) if t["task_id"] == "scan"]
    assert max(t["try_number"] for t in scans) >= 2, scans  # the killed scan ran again
    assert all(t["state"] == "success" and t["hostname"] == "gpu-worker" for t in scans)
    assert _rows(world, run_id) == reference["rows"]
    assert len(list_keys(world, "labeling-dist/tasks/")) == TOP_K  # the same keys: nothing twice
    ledger = json.loads(get_object(world, f"runs/dtm_mining/{run_id}/push/ledger.json"))
    assert ledger["pushed"] == [] and len(ledger["already"]) == TOP_K
    _record(kill_to_success_s=round(time.time() - killed_at, 1))
