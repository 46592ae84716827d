"""Workflow settings from environment variables, with defaults that make the demo work.

Cheap to import (the DAG files read it at parse time). Locations may be folders or
``s3://`` URIs; S3 credentials come from the Airflow connection ``DTM_AWS_CONN_ID``
(default ``aws_default``) when it exists, else from the environment.

| variable | default | meaning |
|---|---|---|
| DTM_HOME | ~/dtm | base folder of the defaults below |
| DTM_FRAMES_URI | $DTM_HOME/lake | the data lake's frames (images) |
| DTM_FEATURES_URI | $DTM_HOME/features | the feature store |
| DTM_REPORTS_URI | $DTM_HOME/reports | detector FP/FN reports (*.jsonl) |
| DTM_RUNS_URI | $DTM_HOME/runs | per-run results, partials, reports; `mined_reports/`: the report files finished runs mined |
| DTM_SINK | manifest | labeling sink: manifest, none |
| DTM_SINK_URI | $DTM_HOME/labeling | where the manifest sink writes |
| DTM_MAX_SCAN_TASKS | 16 | upper bound of mapped scan tasks, whatever the lake's size |
| DTM_MAX_INDEX_TASKS | 16 | upper bound of mapped indexing tasks |
| DTM_GPU_POOL / DTM_GPU_QUEUE | gpu / gpu | pool and queue of the GPU tasks |
| DTM_RETRY_DELAY_S | 30 | seconds between a failed task's tries |
| DTM_GC_GRACE_HOURS | 24 | the scheduled `dtm_store_gc` run deletes nothing younger (`FeatureStore.gc`) |
| DTM_PREFETCH_MB | 512 | the scan's read-ahead budget; read by the feature store in the worker's own process (not here), so each worker can set its own (a GPU worker on fast storage: several shards' worth) |
| DTM_RETAIN_FREED_MB | 1024 | MiB of freed memory a CPU scan's process keeps for reuse, 0: off (`dtm_ops/allocator.py`; read in the worker's own process) |
| DTM_PICK_CACHE | ~/.cache/dtm-ops | folder where a worker keeps the matcher's method picks for its later tasks, off: none (`dtm_ops/picks.py`; read in the worker's own process) |
| DTM_LS_CONN_ID | label_studio_default | Airflow connection of the Label Studio sink (host, token as password, extra: project, frame_urls, chunk_size, min_interval_s) |
| DTM_LS_URL, DTM_LS_TOKEN, DTM_LS_PROJECT, DTM_LS_FRAME_URLS | | the same, when there is no such connection |

Numbers are read by :func:`env_number`: a wrong one raises an error naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass


#: Hours :meth:`dtm_ops.store.FeatureStore.gc` leaves garbage alone by default. A writer puts
#: its shards before the manifest that names them, so an unnamed shard may be one a commit is
#: about to name: the grace must exceed the longest commit (one ``append``: encode, put, retry
#: on conflicts). Here, not in the store, so that the DAG's form can show it at parse time.
GC_GRACE_HOURS = 24.0


#: The mining form's ad-hoc boxes as the form checks them before a run starts (a JSON schema
#: ``pattern``): ``x1,y1,x2,y2`` in pixels, several separated by ``;``, or nothing. The run
#: reads them with :func:`dtm_ops.mining.adhoc_from_form`.
_NUM = r"\s*[-+]?(\d+\.?\d*|\.\d+)\s*"
BOXES_PATTERN = rf"^\s*$|^\s*({_NUM},{_NUM},{_NUM},{_NUM};)*{_NUM},{_NUM},{_NUM},{_NUM};?\s*$"


def number(raw: object, *, source: str, field: str, whole: bool = True, minimum: float = 0,
           maximum: float | None = None) -> int | float:
    """``raw`` (text, as an environment variable or a connection's extra holds it, or a
    number) as a whole or finite number within ``[minimum, maximum]``; anything else raises
    :class:`~dtm_ops.errors.InputError` naming the ``source`` and the ``field``."""
    import math

    value: int | float | None = None
    if not isinstance(raw, bool):
        try:
            value = float(raw)
            if whole and isinstance(raw, str):
                value = int(raw.strip())  # as written: "2.5" and "1e3" are not whole numbers
            elif whole:
                value = int(value) if value.is_integer() else None
        except (TypeError, ValueError):
            value = None
    if value is None or not math.isfinite(value) or value < minimum or (maximum is not None and value > maximum):
        from dtm_ops.errors import InputError  # only on a bad value: the DAG files import this module

        bounds = f"from {minimum:g} to {maximum:g}" if maximum is not None else f">= {minimum:g}"
        raise InputError(f"expected {'a whole' if whole else 'a'} number {bounds}, got {raw!r}",
                         source=source, field=field)
    return value


def env_number(name: str, default: float, env: Mapping[str, str] | None = None, **bounds) -> int | float:
    """The environment variable ``name`` (of ``env``, default ``os.environ``) as :func:`number`
    reads it; ``default`` where it is unset or blank."""
    raw = (os.environ if env is None else env).get(name, "").strip()
    return number(raw, source="environment", field=name, **bounds) if raw else default


def _abs(uri: str) -> str:
    return uri if uri.startswith("s3://") else os.path.abspath(os.path.expanduser(uri))


def asset_uri(uri: str) -> str:
    """An Airflow Asset URI for a location (``file://`` for folders)."""
    return uri if uri.startswith("s3://") else "file://" + _abs(uri)


@dataclass(frozen=True)
class Settings:
    home: str
    frames_uri: str
    features_uri: str
    reports_uri: str
    runs_uri: str
    sink: str
    sink_uri: str
    max_scan_tasks: int
    max_index_tasks: int
    gpu_pool: str
    gpu_queue: str
    aws_conn_id: str
    retry_delay_s: float
    ls_conn_id: str
    gc_grace_hours: float = GC_GRACE_HOURS

    @property
    def mined_reports_uri(self) -> str:
        """Where finished mining runs record the report files they mined (one object per
        file's SHA-256; :func:`dtm_ops.mining.mark_mined`). Beside the run folders, not in
        ``dtm_mining/``, so that a lifecycle rule expiring old runs keeps it."""
        return f"{self.runs_uri.rstrip('/')}/mined_reports"

    def dag_defaults(self, role: str, doc: str | None) -> dict:
        """What every dtm DAG shares: start date, no catch-up, tags, docs and the retry policy."""
        from datetime import datetime, timedelta

        return {
            "start_date": datetime(2026, 1, 1),
            "catchup": False,
            "tags": ["dtm", role],
            "doc_md": doc,
            "default_args": {"retries": 2, "retry_delay": timedelta(seconds=self.retry_delay_s)},
        }

    @classmethod
    def from_env(cls) -> "Settings":
        e = os.environ
        home = _abs(e.get("DTM_HOME", "~/dtm"))
        return cls(
            home=home,
            frames_uri=_abs(e.get("DTM_FRAMES_URI", f"{home}/lake")),
            features_uri=_abs(e.get("DTM_FEATURES_URI", f"{home}/features")),
            reports_uri=_abs(e.get("DTM_REPORTS_URI", f"{home}/reports")),
            runs_uri=_abs(e.get("DTM_RUNS_URI", f"{home}/runs")),
            sink=e.get("DTM_SINK", "manifest"),
            sink_uri=_abs(e.get("DTM_SINK_URI", f"{home}/labeling")),
            max_scan_tasks=env_number("DTM_MAX_SCAN_TASKS", 16, minimum=1),
            max_index_tasks=env_number("DTM_MAX_INDEX_TASKS", 16, minimum=1),
            gpu_pool=e.get("DTM_GPU_POOL", "gpu"),
            gpu_queue=e.get("DTM_GPU_QUEUE", "gpu"),
            aws_conn_id=e.get("DTM_AWS_CONN_ID", "aws_default"),
            retry_delay_s=env_number("DTM_RETRY_DELAY_S", 30.0, whole=False),
            ls_conn_id=e.get("DTM_LS_CONN_ID", "label_studio_default"),
            gc_grace_hours=env_number("DTM_GC_GRACE_HOURS", GC_GRACE_HOURS, whole=False),
        )


def use_airflow_connection(conn_id: str, *, server: bool = False) -> None:
    """Take S3 settings from the Airflow connection ``conn_id`` if it exists (the
    environment is used otherwise). Inside a task by default; ``server=True`` in Airflow's
    own processes (the API server's results view), which read connections directly.
    Secrets are never logged."""
    from dtm_ops.store.objects import S3Config, set_default_s3_config

    try:
        if server:
            from airflow.models.connection import Connection

            conn = Connection.get_connection_from_secrets(conn_id)
        else:
            from airflow.sdk import BaseHook

            conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - no such connection: the environment applies
        set_default_s3_config(None)
        return
    set_default_s3_config(S3Config.from_aws_connection(conn.login, conn.password, conn.extra_dejson,
                                                       source=f"connection {conn_id}"))


def label_studio_config(conn_id: str):
    """Inside a task: the Label Studio sink's settings from the Airflow connection
    ``conn_id`` if it exists, else from the environment."""
    from dtm_ops.sinks.label_studio import LabelStudioConfig

    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # noqa: BLE001 - no such connection: the environment applies
        return LabelStudioConfig.from_env()
    host = conn.host or ""
    if host and not host.startswith(("http://", "https://")):
        host = f"{conn.schema or 'http'}://{host}"
    if conn.port:
        host = f"{host}:{conn.port}"
    return LabelStudioConfig.from_connection(host, conn.password, conn.extra_dejson, source=f"connection {conn_id}")
