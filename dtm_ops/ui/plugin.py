"""The Airflow plugin of the results view (loaded from ``plugins/dtm_results.py``).

- ``fastapi_apps``: :mod:`dtm_ops.ui.app` under ``/dtm`` in the API server;
- ``external_views``: a "Mining results" tab on DAG run pages and on task instance pages
  (the view in an iframe, templated with the DAG id, run id, task id and map index);
- ``global_operator_extra_links``: a "Mining results" button on the scan, merge, push and
  publish_report tasks of ``dtm_mining`` (any other task gets no link).

The FastAPI app is built on first access of ``fastapi_apps``, which only the API server
makes: schedulers, DAG processors and workers that load plugins import no web code.
"""

from __future__ import annotations

import functools
import os
from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

URL_PREFIX = "/dtm"
RESULT_DAGS = {d.strip() for d in os.environ.get("DTM_RESULTS_DAGS", "dtm_mining").split(",") if d.strip()}
LINKED_TASKS = {"scan", "merge", "validate_results", "push", "publish_report"}


class MiningResultsLink(BaseOperatorLink):
    """The results view of a task's run, for the tasks whose output it shows."""

    name = "Mining results"

    def get_link(self, operator, *, ti_key) -> str:
        if ti_key.dag_id not in RESULT_DAGS or ti_key.task_id not in LINKED_TASKS:
            return ""
        from airflow.configuration import conf

        base = conf.get("api", "base_url", fallback="") or ""
        base = base.rstrip("/") if base.startswith(("http://", "https://")) else ""
        return f"{base}{URL_PREFIX}/runs/{quote(ti_key.dag_id, safe='')}/{quote(ti_key.run_id, safe='')}"


class _LazyApps:
    """``fastapi_apps``, built when the API server first reads it."""

    def __get__(self, obj, owner) -> list[dict]:
        return _apps()


@functools.cache
def _apps() -> list[dict]:
    from dtm_ops.ui.app import create_app

    return [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "dtm-ops mining results"}]


class DtmResultsPlugin(AirflowPlugin):
    name = "dtm_results"
    fastapi_apps = _LazyApps()
    external_views = [
        {"name": "Mining results", "href": "dtm/runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "dtm-results", "category": "dtm-ops"},
        {"name": "Mining results", "href": "dtm/runs/{DAG_ID}/{RUN_ID}/tasks/{TASK_ID}/{MAP_INDEX}",
         "destination": "task_instance", "url_route": "dtm-task-results", "category": "dtm-ops"},
    ]
    global_operator_extra_links = [MiningResultsLink()]
