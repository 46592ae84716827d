"""### dtm_feature_index

Indexes the data lake for Deep Template Matching: lists frames not yet in the feature
store, extracts their features in mapped batches (one task per batch of frames, never per
frame, at most `DTM_MAX_INDEX_TASKS` of them), and appends shards. Each batch commits a
new manifest version; batches run in parallel safely (commits are exclusive and retried).
Updates the `dtm_features` Asset, which the mining DAG reads. Frames that cannot be read
(damaged files) are left out and named in the `publish` task's log and summary; the next
run tries them again.

Settings: see `dtm_ops/settings.py` (`DTM_FRAMES_URI`, `DTM_FEATURES_URI`, ...).
"""

from __future__ import annotations

from airflow.sdk import Asset, Param, dag, task

from dtm_ops.settings import Settings, asset_uri

S = Settings.from_env()
FEATURES = Asset(name="dtm_features", uri=asset_uri(S.features_uri))


@dag(
    dag_id="dtm_feature_index",
    schedule="@daily",
    max_active_runs=1,
    **S.dag_defaults("indexing", __doc__),
    params={
        "frames_uri": Param(S.frames_uri, type="string", title="Frames", description="Folder or s3:// prefix of frame images to index."),
        "batch_frames": Param(64, type="integer", minimum=1, title="Frames per task", description="Frames one mapped task indexes (more when the task cap is reached)."),
        "dtype": Param("float16", enum=["float16", "float32", "int8"], title="Storage dtype"),
    },
)
def dtm_feature_index():
    @task
    def plan_batches(params: dict) -> list[str]:
        """Frames not yet indexed, cut into at most DTM_MAX_INDEX_TASKS batches (keys of
        their frame lists in the store: XCom carries keys, not frame lists)."""
        from dtm_ops.indexing import plan_index_batches
        from dtm_ops.settings import use_airflow_connection

        use_airflow_connection(S.aws_conn_id)
        return plan_index_batches(params["frames_uri"], S.features_uri, params["batch_frames"], S.max_index_tasks)

    @task(pool=S.gpu_pool, queue=S.gpu_queue, retries=3, max_active_tis_per_dagrun=4)
    def index_batch(batch: str, params: dict) -> dict:
        from dtm_ops.indexing import index_batch as run
        from dtm_ops.settings import use_airflow_connection

        use_airflow_connection(S.aws_conn_id)
        return run(batch, S.features_uri, dtype=params["dtype"])

    @task(outlets=[FEATURES])
    def publish(summaries: list[dict]) -> dict:
        from dtm_ops.indexing import summarize_index
        from dtm_ops.settings import use_airflow_connection

        use_airflow_connection(S.aws_conn_id)
        return summarize_index(S.features_uri, list(summaries))

    publish(index_batch.expand(batch=plan_batches()))


dtm_feature_index()
