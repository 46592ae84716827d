#!/usr/bin/env bash
# The main job on the embedded defaults: Airflow 3 with SQLite, the demo lake indexed by
# dtm_feature_index, and a dtm_mining run on a sample FP/FN report. Everything lives in
# demo-output/ (AIRFLOW_HOME, lake, features, runs, labeling tasks).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${DTM_DEMO_OUT:-$ROOT/demo-output}
export PATH="$ROOT/.venv/bin:$PATH"
export DTM_HOME=$OUT
export AIRFLOW_HOME=$OUT/airflow
export AIRFLOW__CORE__DAGS_FOLDER=$ROOT/dags
export AIRFLOW__CORE__PLUGINS_FOLDER=$ROOT/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__UNIT_TEST_MODE=False
export GX_ANALYTICS_ENABLED=false
export PYTHONWARNINGS=ignore
mkdir -p "$AIRFLOW_HOME"

echo "demo: building the demo lake and a sample report in $OUT"
python - <<PY
from dtm_ops.demo import build_lake, write_sample_report
lake = build_lake("$OUT/lake")
write_sample_report(lake, "$OUT/reports/sample.jsonl")
PY
echo "demo: preparing Airflow (SQLite) in $AIRFLOW_HOME"
airflow db migrate >/dev/null
airflow pools set gpu 2 "GPU workers (the scan and indexing tasks)" >/dev/null
echo "demo: running dtm_feature_index"
airflow dags test dtm_feature_index >"$OUT/dtm_feature_index.log" 2>&1 || { tail -40 "$OUT/dtm_feature_index.log"; exit 1; }
echo "demo: running dtm_mining on $OUT/reports/sample.jsonl"
airflow dags test dtm_mining -c "{\"report_uri\": \"$OUT/reports/sample.jsonl\"}" >"$OUT/dtm_mining.log" 2>&1 || { tail -40 "$OUT/dtm_mining.log"; exit 1; }
report=$(ls -td "$OUT"/runs/dtm_mining/*/report/index.html | head -1)
run=$(dirname "$(dirname "$report")")
echo "demo: quarantined reports: $(wc -l < "$run/reports/quarantine.jsonl") (see $run/reports/quarantine.jsonl)"
echo "demo: results: $run/results.jsonl ($(wc -l < "$run/results.jsonl") hits)"
echo "demo: labeling tasks: $OUT/labeling/tasks/ ($(ls "$OUT/labeling/tasks" | wc -l) tasks)"
echo "demo: run report: $report"
echo "demo: in the Airflow UI (airflow standalone, see README), the run's \"Mining results\" tab:"
run_id=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['run_id'])" "$run/report/summary.json")
echo "      http://localhost:8080/dtm/runs/dtm_mining/$run_id"
