"""### dtm_store_gc

Deletes what the feature store no longer uses, once it is older than the grace period:
shards no manifest names (left by index tasks that died before their commit, or by commits
that lost some of their frames to another writer) and the index runs' staging files.
Every manifest version stays readable. Fails, after collecting, when shards the manifest
names are missing: scans of the store would fail on them.

Weekly; trigger it with the form for a dry run (it lists what would be deleted) or another
grace period. Settings: `DTM_FEATURES_URI`, `DTM_GC_GRACE_HOURS` (the scheduled runs' grace,
default 24) and the AWS connection (`dtm_ops/settings.py`).
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task

from dtm_ops.settings import Settings

S = Settings.from_env()


@dag(
    dag_id="dtm_store_gc",
    schedule="@weekly",
    max_active_runs=1,
    **S.dag_defaults("maintenance", __doc__),
    params={
        "grace_hours": Param(S.gc_grace_hours, type="number", minimum=0, title="Grace period (hours)",
                             description="Delete nothing younger: a writer puts its shards before it commits them."),
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="List what would be deleted; delete nothing."),
    },
)
def dtm_store_gc():
    @task
    def collect_garbage(params: dict) -> dict:
        """Each deleted key is logged by the store; the summary is the task's XCom."""
        from dtm_ops.settings import use_airflow_connection
        from dtm_ops.store import FeatureStore

        use_airflow_connection(S.aws_conn_id)
        report = FeatureStore.open(S.features_uri).gc(grace_s=params["grace_hours"] * 3600, dry_run=params["dry_run"])
        report.check()
        return report.summary()

    collect_garbage()


dtm_store_gc()
