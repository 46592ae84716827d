"""A real Airflow on 127.0.0.1 for tests: ``airflow standalone`` (API server, scheduler, DAG
processor, triggerer) with the simple auth manager's users, and a small REST v2 client
(:class:`AirflowClient`, also used for the loopback Celery cluster)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
BIKE = [268.0, 10.0, 535.0, 212.0]  # the parked bicycle in bikes.mp4 frame 220


def airflow_cli(env: dict, *args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "airflow"), *args], env=env, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"airflow {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def list_keys(world: dict, prefix: str) -> list[str]:
    pages = world["client"].get_paginator("list_objects_v2").paginate(Bucket=world["bucket"], Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def get_object(world: dict, key: str) -> bytes:
    return world["client"].get_object(Bucket=world["bucket"], Key=key)["Body"].read()


def put_report(world: dict) -> None:
    """One good report and one with a box outside its frame, in the bucket's reports/ prefix."""
    report = [
        {"schema": "dtm-report/1", "report_id": "bicycle-fn", "frame_uri": f"s3://{world['bucket']}/lake/bikes/000220.jpg",
         "error_type": "false_negative", "class": "bicycle", "boxes": [BIKE]},
        {"schema": "dtm-report/1", "report_id": "bad", "frame_uri": f"s3://{world['bucket']}/lake/bikes/000220.jpg",
         "error_type": "false_positive", "class": "bicycle", "boxes": [[600, 100, 900, 200]], "score": 0.4},
    ]
    world["client"].put_object(Bucket=world["bucket"], Key="reports/day1.jsonl",
                               Body="".join(json.dumps(r) + "\n" for r in report).encode())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowClient:
    """The REST API v2 of a running Airflow, as its users. ``users``: name -> (role,
    password) or (role, password, teams)."""

    def __init__(self, url: str, users: dict[str, tuple]) -> None:
        self.url = url
        self.users = users
        self._tokens: dict[str, str] = {}

    def log_tail(self, n: int = 3000) -> str:
        return ""

    # ------------------------------------------------------------------ HTTP
    def request(self, method: str, path: str, body=None, token: str | None = None):
        """(status, headers, bytes); HTTP errors are returned, not raised."""
        req = urllib.request.Request(self.url + path, method=method,
                                     data=json.dumps(body).encode() if body is not None else None)
        req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def api(self, method: str, path: str, body=None, token: str | None = None):
        status, _, data = self.request(method, path, body, token)
        if status >= 400:
            raise urllib.error.HTTPError(self.url + path, status, data.decode(errors="replace")[:500], None, None)
        return status, json.loads(data or b"null")

    def token(self, user: str) -> str:
        if user not in self._tokens:
            _, tok = self.api("POST", "/auth/token", {"username": user, "password": self.users[user][1]})
            self._tokens[user] = tok["access_token"]
        return self._tokens[user]

    # ------------------------------------------------------------------ runs
    def wait_for_dag(self, dag_id: str, user: str, timeout: float = 240) -> None:
        deadline = time.time() + timeout
        while True:  # the DAG processor has parsed it
            try:
                self.api("GET", f"/api/v2/dags/{dag_id}", token=self.token(user))
                return
            except urllib.error.HTTPError:
                assert time.time() < deadline, self.log_tail()
                time.sleep(1)

    def trigger(self, dag_id: str, run_id: str, conf: dict, user: str) -> None:
        token = self.token(user)
        self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False}, token=token)
        self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"dag_run_id": run_id, "logical_date": None, "conf": conf},
                 token=token)

    def wait_for_run(self, dag_id: str, run_id: str, user: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while True:
            _, run = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}", token=self.token(user))
            if run["state"] in ("success", "failed"):
                return run
            assert time.time() < deadline, self.log_tail()
            time.sleep(2)

    def task_instances(self, dag_id: str, run_id: str, user: str) -> list[dict]:
        _, tis = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000", token=self.token(user))
        return tis["task_instances"]


class AirflowServer(AirflowClient):
    """``airflow standalone`` on a free port, with the simple auth manager's ``users``."""

    def __init__(self, env: dict, log_path: Path, users: dict[str, tuple]) -> None:
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", users)
        home = Path(env["AIRFLOW_HOME"])
        home.mkdir(parents=True, exist_ok=True)
        passwords = home / "passwords.json"
        passwords.write_text(json.dumps({u: spec[1] for u, spec in users.items()}))
        self.env = {
            **env,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(
                ":".join([u, spec[0], *spec[2:]]) for u, spec in users.items()),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__SCHEDULER__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        }
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def log_tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def start(self, timeout: float = 240) -> "AirflowServer":
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([str(BIN / "airflow"), "standalone"], env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while True:
            try:
                _, health = self.api("GET", "/api/v2/monitor/health")
                if health["metadatabase"]["status"] == "healthy" and health["scheduler"]["status"] == "healthy":
                    return self
            except (OSError, urllib.error.URLError, KeyError, TypeError):
                pass
            assert self.proc.poll() is None and time.time() < deadline, self.log_tail()
            time.sleep(1)

    def stop(self) -> None:
        if self.proc is None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
