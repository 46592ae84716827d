"""The results view's FastAPI app, mounted by the Airflow API server (``/dtm``).

Routes (all ``GET``, all behind Airflow's login and the caller's read access to the DAG's
runs, checked before any file is read):

| route | what |
|---|---|
| ``/runs/{dag_id}/{run_id}`` | run overview: queries, counts, quarantine, validation, task timings |
| ``/runs/{dag_id}/{run_id}/queries/{query_id}?page=&per_page=`` | one query's hits in rank order |
| ``/runs/{dag_id}/{run_id}/images/{path}`` | a rendered image of the run's report (thumbnails, heat maps) |
| ``/runs/{dag_id}/{run_id}/tasks/{task_id}/{map_index}`` | a task instance's view: redirects to the overview |

Airflow's FastAPI plugin apps are not protected by its login on their own: every route
here depends on :func:`airflow.api_fastapi.core_api.security.requires_access_dag`, which
reads the same JWT (bearer header or the UI's ``_token`` cookie) as Airflow's own API and
asks the configured auth manager. A request without a valid token gets 401 (403 for a bad
one) and a user who may not read the DAG's runs gets 403, with no image bytes.
"""


import functools
import re
from urllib.parse import quote

from dtm_ops.settings import Settings

DAG_ID = re.compile(r"^[A-Za-z0-9_.-]{1,250}$")


def create_app(settings: Settings | None = None):
    """The app. Airflow's security and models are imported here: only the API server calls it."""
    from fastapi import Depends, FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, RedirectResponse, Response

    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
    from airflow.api_fastapi.core_api.security import requires_access_dag

    from dtm_ops.ui import pages
    from dtm_ops.ui.results import BadRequest, NotFound, RunResults

    settings = settings or Settings.from_env()
    app = FastAPI(title="dtm-ops mining results", docs_url=None, redoc_url=None, openapi_url=None)
    can_read_runs = [Depends(requires_access_dag("GET", DagAccessEntity.RUN))]

    @functools.cache
    def s3_settings() -> None:
        """The aws connection, read once (not on every image request)."""
        from dtm_ops.settings import use_airflow_connection

        use_airflow_connection(settings.aws_conn_id, server=True)

    @functools.lru_cache(maxsize=128)
    def run_folder(dag_id: str, run_id: str):
        """One folder (and its S3 client) per run, reused by the page and its images."""
        from dtm_ops.mining import RunFolder

        s3_settings()
        return RunFolder.for_run(settings.runs_uri, dag_id, run_id)

    def results(dag_id: str, run_id: str) -> RunResults:
        if not DAG_ID.match(dag_id) or not _run_exists(dag_id, run_id):
            raise HTTPException(404, f"no run {run_id!r} of DAG {dag_id!r}")
        return RunResults(run_folder(dag_id, run_id))

    def base(request: Request, dag_id: str, run_id: str) -> str:
        return f"{request.scope.get('root_path', '')}/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"

    def guarded(fn):
        try:
            return fn()
        except NotFound as exc:
            raise HTTPException(404, str(exc)) from None
        except BadRequest as exc:
            raise HTTPException(400, str(exc)) from None

    @app.get("/runs/{dag_id}/{run_id}", response_class=HTMLResponse, dependencies=can_read_runs)
    def run_overview(request: Request, dag_id: str, run_id: str):
        data = guarded(lambda: results(dag_id, run_id).overview())
        return pages.overview(base(request, dag_id, run_id), dag_id, run_id, data, _task_instances(dag_id, run_id))

    @app.get("/runs/{dag_id}/{run_id}/queries/{query_id}", response_class=HTMLResponse, dependencies=can_read_runs)
    def query_view(request: Request, dag_id: str, run_id: str, query_id: str,
                   page: int = Query(1, ge=1), per_page: int = Query(24, ge=1, le=200)):
        qp = guarded(lambda: results(dag_id, run_id).query(query_id, page, per_page))
        return pages.query_page(base(request, dag_id, run_id), run_id, qp)

    @app.get("/runs/{dag_id}/{run_id}/images/{path:path}", dependencies=can_read_runs)
    def image(dag_id: str, run_id: str, path: str):
        data, media_type = guarded(lambda: results(dag_id, run_id).image(path))
        # Rendered once per run and never changed: the browser may keep them.
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=86400"})

    @app.get("/runs/{dag_id}/{run_id}/tasks/{task_id}/{map_index}", dependencies=can_read_runs)
    def task_view(request: Request, dag_id: str, run_id: str, task_id: str, map_index: str):
        if not results(dag_id, run_id).exists():
            raise HTTPException(404, f"no mining results for run {run_id!r}")
        return RedirectResponse(base(request, dag_id, run_id), status_code=307)

    return app


def _run_exists(dag_id: str, run_id: str) -> bool:
    from sqlalchemy import select

    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        return session.scalar(select(DagRun.id).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id)) is not None


def _task_instances(dag_id: str, run_id: str) -> list[dict]:
    """The run's task instances, for the timings table."""
    from sqlalchemy import select

    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.scalars(select(TI).where(TI.dag_id == dag_id, TI.run_id == run_id)).all()
        out = [{"task_id": t.task_id, "map_index": t.map_index, "state": t.state, "try_number": t.try_number,
                "start_date": t.start_date.isoformat(timespec="seconds") if t.start_date else None, "duration": t.duration}
               for t in rows]
    return sorted(out, key=lambda t: (t["start_date"] or "~", t["task_id"], t["map_index"]))
