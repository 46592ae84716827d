"""DAG integrity: the DAGs parse without heavy imports, with retries, tags, pools and the
trigger form. Each DAG file is imported in a clean interpreter, as the DAG processor would.

How long a DAG file takes to parse is measured by ``benchmarks/bench_dag_parse.py``, against
a minimal DAG in the same run, not asserted here: a timed test fails on a busy machine."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

DAGS = Path(__file__).resolve().parents[1] / "dags"
HEAVY = ["torch", "torchvision", "boto3", "botocore", "great_expectations", "numpy", "PIL", "pandas", "av", "safetensors"]

PROBE = r"""
import importlib.util, json, sys
from airflow.sdk.definitions._internal.contextmanager import DagContext
spec = importlib.util.spec_from_file_location("dagfile", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
sys.modules["dagfile"] = mod
DagContext.current_autoregister_module_name = "dagfile"  # as the DAG processor does
spec.loader.exec_module(mod)
dags = [d for d, _ in DagContext.autoregistered_dags]
out = {"heavy": sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules),
       "project": sorted(m for m in sys.modules if m.split(".")[0] == "dtm_ops"), "dags": []}
for d in dags:
    out["dags"].append({
        "dag_id": d.dag_id, "tags": sorted(d.tags), "params": sorted(d.params.keys()),
        "defaults": {k: d.params[k] for k in d.params.keys() if isinstance(d.params[k], (int, float, str, bool))},
        "tasks": {t.task_id: {"retries": t.retries, "pool": t.pool, "queue": t.queue,
                              "mapped": "Mapped" in type(t).__name__} for t in d.tasks},
    })
print(json.dumps(out))
"""


def _env(tmp_path, **env_vars: str) -> dict:
    """A clean environment for a probe: its own Airflow home and dtm-ops home."""
    return {"AIRFLOW_HOME": str(tmp_path / "airflow"), "PATH": str(Path(sys.executable).parent), "DTM_HOME": str(tmp_path),
            **env_vars}


def _parse(path: Path, tmp_path, **env_vars: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", PROBE, str(path), json.dumps(HEAVY)], capture_output=True, text=True,
                          env=_env(tmp_path, **env_vars), timeout=120)


def _probe(path: Path, tmp_path, **env_vars: str) -> dict:
    r = _parse(path, tmp_path, **env_vars)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["dtm_feature_index", "dtm_mining", "dtm_store_gc"])
def test_dag_parses_without_heavy_imports(name, tmp_path):
    out = _probe(DAGS / f"{name}.py", tmp_path)
    assert [d["dag_id"] for d in out["dags"]] == [name]
    assert out["heavy"] == [], f"imported at parse time: {out['heavy']}"
    # the settings module only: everything else of the package is imported by task bodies
    assert out["project"] == ["dtm_ops", "dtm_ops.settings"], f"imported at parse time: {out['project']}"
    dag = out["dags"][0]
    assert "dtm" in dag["tags"]
    assert all(t["retries"] >= 0 for t in dag["tasks"].values())
    assert sum(t["retries"] > 0 for t in dag["tasks"].values()) >= len(dag["tasks"]) - 2


def test_mining_dag_maps_the_scan_on_the_gpu_pool_and_has_the_form(tmp_path):
    dag = _probe(DAGS / "dtm_mining.py", tmp_path)["dags"][0]
    scan = dag["tasks"]["scan"]
    assert scan["mapped"] and scan["pool"] == "gpu" and scan["queue"] == "gpu" and scan["retries"] >= 1
    assert {"report_uri", "frame_uri", "boxes", "class_name", "top_k", "min_score", "scales", "mode", "dedupe_window", "sink", "dry_run"} <= set(dag["params"])
    order = ["fetch_reports", "validate_reports", "build_templates", "plan_scan", "scan", "merge", "validate_results", "push", "publish_report"]
    assert set(order) == set(dag["tasks"])


def test_gc_dag_form_takes_its_grace_period_from_the_environment(tmp_path):
    """The scheduled run's grace period is the form's default: DTM_GC_GRACE_HOURS, else 24."""
    assert _probe(DAGS / "dtm_store_gc.py", tmp_path)["dags"][0]["defaults"] == {"grace_hours": 24.0, "dry_run": False}
    dag = _probe(DAGS / "dtm_store_gc.py", tmp_path, DTM_GC_GRACE_HOURS="6")["dags"][0]
    assert dag["defaults"]["grace_hours"] == 6.0 and list(dag["tasks"]) == ["collect_garbage"]


def test_a_wrong_number_in_the_environment_is_a_parse_error_that_names_the_variable(tmp_path):
    """What the DAG processor shows as the file's import error."""
    r = _parse(DAGS / "dtm_mining.py", tmp_path, DTM_MAX_SCAN_TASKS="16x")
    assert r.returncode != 0
    assert "InputError: environment: field 'DTM_MAX_SCAN_TASKS': expected a whole number >= 1, got '16x'" in r.stderr


FORM_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("dagfile", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
param = mod.dtm_mining().params.get_param("boxes")
out = {}
for value in json.loads(sys.argv[2]):
    try:
        param.resolve(value)
        out[str(value)] = "ok"
    except Exception as exc:
        out[str(value)] = type(exc).__name__
print(json.dumps(out))
"""


def test_the_mining_form_refuses_boxes_the_run_could_not_read_before_the_run_starts(tmp_path):
    """Airflow checks the form's values against the Param's schema when a run is triggered;
    the pattern itself is tested against the run's reading in ``test_trigger_form.py``."""
    env = _env(tmp_path)
    values = [None, "", "268,10,535,212", "1,2,3,4; 5,6,7,8", "1,2,3", "a,b,c,d", "1,2,3,4 5,6,7,8"]
    r = subprocess.run([sys.executable, "-c", FORM_PROBE, str(DAGS / "dtm_mining.py"), json.dumps(values)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"None": "ok", "": "ok", "268,10,535,212": "ok", "1,2,3,4; 5,6,7,8": "ok",
                   "1,2,3": "ParamValidationError", "a,b,c,d": "ParamValidationError",
                   "1,2,3,4 5,6,7,8": "ParamValidationError"}


def test_index_dag_maps_batches_on_the_gpu_pool(tmp_path):
    dag = _probe(DAGS / "dtm_feature_index.py", tmp_path)["dags"][0]
    assert dag["tasks"]["index_batch"]["mapped"] and dag["tasks"]["index_batch"]["pool"] == "gpu"


PLUGIN_PROBE = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("dtm_results", sys.argv[1])
mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
heavy = json.loads(sys.argv[2]) + ["fastapi", "airflow.api_fastapi.core_api.security"]
out = {"heavy_before": sorted(m for m in heavy if m in sys.modules)}
apps = mod.DtmResultsPlugin.fastapi_apps  # what the API server reads: builds the app now
out["apps"] = [(a["url_prefix"], type(a["app"]).__name__) for a in apps]
out["views"] = sorted((v["destination"], v["href"]) for v in mod.DtmResultsPlugin.external_views)
print(json.dumps(out))
"""


def test_plugin_loads_without_web_or_heavy_imports_until_the_api_server_asks(tmp_path):
    """Schedulers and workers load plugins too: the results view's app is built only when
    the API server reads ``fastapi_apps``."""
    env = _env(tmp_path)
    r = subprocess.run([sys.executable, "-c", PLUGIN_PROBE, str(DAGS.parent / "plugins" / "dtm_results.py"), json.dumps(HEAVY)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["heavy_before"] == []
    assert out["apps"] == [["/dtm", "FastAPI"]]
    assert out["views"] == [["dag_run", "dtm/runs/{DAG_ID}/{RUN_ID}"],
                            ["task_instance", "dtm/runs/{DAG_ID}/{RUN_ID}/tasks/{TASK_ID}/{MAP_INDEX}"]]
