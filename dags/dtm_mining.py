"""### dtm_mining

Turns detector failure reports (false positives, missed objects) into labeled-data
requests by Deep Template Matching:

fetch reports -> validate (Great Expectations; bad records quarantined with reasons) ->
build templates (ROI crops, query features once) -> plan the scan (groups of shards, at
most `DTM_MAX_SCAN_TASKS`) -> scan (mapped over shard groups, GPU pool/queue, all queries
in one pass) -> merge top-k (near-duplicates of a sequence suppressed) -> validate results
(Great Expectations; a failure blocks the push) -> push to the labeling queue (idempotent)
-> publish the run report (HTML contact sheet with heat maps, JSON summary).

Runs daily and whenever the `dtm_reports` Asset is updated, on the report files no finished
run has mined (a run with nothing new ends at `fetch_reports`, its other tasks skipped);
trigger it by hand with the form for a report file or an ad-hoc query. Settings:
`dtm_ops/settings.py`.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, get_current_context, task

from dtm_ops.settings import BOXES_PATTERN, Settings, asset_uri

S = Settings.from_env()
REPORTS = Asset(name="dtm_reports", uri=asset_uri(S.reports_uri))
FEATURES = Asset(name="dtm_features", uri=asset_uri(S.features_uri))


def _run():
    """This run's folder and the form's parameters (inside a task)."""
    from dtm_ops.mining import MiningConfig, RunFolder
    from dtm_ops.settings import use_airflow_connection

    use_airflow_connection(S.aws_conn_id)
    ctx = get_current_context()
    params = ctx["params"]
    run = RunFolder.for_run(S.runs_uri, ctx["dag"].dag_id, ctx["run_id"])
    return run, MiningConfig.from_params(S.features_uri, params), params, ctx["run_id"]


@dag(
    dag_id="dtm_mining",
    schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"), assets=REPORTS),
    max_active_runs=2,
    **S.dag_defaults("mining", __doc__),
    params={
        "report_uri": Param(S.reports_uri, type=["null", "string"], title="Report file or prefix",
                            description="A *.jsonl report file, or a folder / s3:// prefix of them. Empty for an ad-hoc query only.",
                            section="What to mine"),
        "frame_uri": Param(None, type=["null", "string"], title="Ad-hoc query: frame",
                           description="Image path or s3:// URI of a frame to query (in addition to the reports).", section="What to mine"),
        "boxes": Param(None, type=["null", "string"], pattern=BOXES_PATTERN, title="Ad-hoc query: boxes",
                       description="x1,y1,x2,y2 in pixels; several boxes separated by ';' (co-occurring objects).", section="What to mine"),
        "class_name": Param("object", type="string", title="Ad-hoc query: class", section="What to mine"),
        "only_new_reports": Param(False, type="boolean", title="Only report files not mined before",
                                  description="Skip report files (same bytes) that a finished run has mined. Scheduled "
                                  "and Asset-triggered runs always skip them.", section="What to mine"),
        "top_k": Param(20, type="integer", minimum=1, maximum=1000, title="Frames per query", section="Search"),
        "min_score": Param(None, type=["null", "number"], title="Minimum score", description="Calibrated score (z) a hit must reach.", section="Search"),
        "scales": Param(None, type=["null", "string"], title="Template scales", description="Comma-separated, e.g. 0.5,1,2 (default 0.25..8).", section="Search"),
        "mode": Param("any", enum=["any", "all"], title="Several boxes", description="any: best box; all: a frame must hold every box.", section="Search"),
        "dedupe_window": Param(5, type="integer", minimum=0, title="Near-duplicate window (frames)",
                               description="Frames of one sequence this close to the query frame or to a better hit are skipped.",
                               section="Search"),
        "sink": Param(S.sink, enum=["manifest", "label_studio", "none"], title="Labeling sink",
                      description="manifest: task files in DTM_SINK_URI; label_studio: the label_studio_default connection's project.",
                      section="Output"),
        "dry_run": Param(False, type="boolean", title="Dry run", description="Mine and report, push nothing.", section="Output"),
    },
)
def dtm_mining():
    @task
    def fetch_reports() -> dict:
        from airflow.sdk.exceptions import AirflowSkipException

        from dtm_ops.mining import adhoc_from_form, fetch_reports as fetch, only_new_reports

        run, _, params, _ = _run()
        adhoc = adhoc_from_form(params.get("frame_uri"), params.get("boxes"), params.get("class_name"))
        only_new = only_new_reports(get_current_context()["dag_run"].run_type, params.get("only_new_reports"))
        out = fetch(run, params.get("report_uri"), adhoc, mined_uri=S.mined_reports_uri, only_new=only_new)
        if out["nothing_new"]:  # the run ends here, successful, its other tasks skipped
            raise AirflowSkipException(f"all {out['already_mined']} report file(s) were mined before: nothing new to mine")
        return out

    @task(retries=0)
    def validate_reports(_: dict) -> dict:
        from dtm_ops.mining import validate_reports as gate

        return gate(_run()[0])

    @task(inlets=[FEATURES])
    def build_templates(_: dict) -> dict:
        from dtm_ops.mining import build_templates as build

        run, cfg, _, _ = _run()
        return build(run, cfg)

    @task
    def plan_scan(templates: dict) -> list[dict]:
        from dtm_ops.mining import plan_scan as plan

        _, cfg, _, _ = _run()
        return plan(cfg, S.max_scan_tasks, templates["manifest_version"])

    @task(pool=S.gpu_pool, queue=S.gpu_queue, retries=3, max_active_tis_per_dagrun=8)
    def scan(group: dict) -> str:
        from dtm_ops.mining import scan_group

        run, cfg, _, _ = _run()
        return scan_group(run, cfg, group)

    @task
    def merge(partials: list[str]) -> dict:
        from dtm_ops.mining import merge_results

        run, cfg, _, _ = _run()
        return merge_results(run, cfg, list(partials))

    @task(retries=0)
    def validate_results(_: dict) -> dict:
        from dtm_ops.mining import validate_results as gate

        run, cfg, _, _ = _run()
        return gate(run, cfg)

    @task
    def push(_: dict) -> dict:
        from dtm_ops.mining import push as send
        from dtm_ops.settings import label_studio_config

        run, cfg, params, run_id = _run()
        ls = label_studio_config(S.ls_conn_id) if params["sink"] == "label_studio" else None
        return send(run, cfg, params["sink"], S.sink_uri, run_id=run_id, dry_run=params["dry_run"], label_studio=ls,
                    mined_uri=S.mined_reports_uri)

    @task
    def publish_report(fetched: dict, checked: dict, pushed: dict) -> dict:
        import logging

        from dtm_ops.mining import publish_report as publish

        run, cfg, _, run_id = _run()
        out = publish(run, cfg, {"run_id": run_id, "fetched": fetched, "validation": checked, "push": pushed})
        logging.getLogger(__name__).info("run report: %s", out["report"])
        return out

    fetched = fetch_reports()
    checked = validate_reports(fetched)
    templates = build_templates(checked)
    merged = merge(scan.expand(group=plan_scan(templates)))
    pushed = push(validate_results(merged))
    publish_report(fetched, checked, pushed)


dtm_mining()
