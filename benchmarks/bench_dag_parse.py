"""How long each DAG file takes to parse, as Airflow measures it, beside a minimal DAG.

Each file is parsed by Airflow's own ``DagBag`` in a fresh process, as the DAG processor
parses one file: Airflow is imported first (the processor has it loaded before it reads a
file), then the file, whose parse time is the ``duration`` that ``DagBag`` records (what
``airflow dags report`` prints). The reference is a DAG with one task and one Param,
written by this script: the least any TaskFlow DAG file costs, so the ratio is what our
files add. The rounds alternate the files; the table gives medians. The last column is the
file's share of issue 4's budget of 2 s per file. Airflow's import is shown beside it and
is not in the share: the processor pays it once, not per file (Airflow's own
``dagbag_import_timeout`` likewise times the file alone).

    .venv/bin/python benchmarks/bench_dag_parse.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

DAGS = Path(__file__).resolve().parents[1] / "dags"
BUDGET_S = 2.0

MINIMAL_DAG = '''
from airflow.sdk import Param, dag, task


@dag(schedule=None, params={"n": Param(1, type="integer")}, tags=["reference"])
def minimal():
    @task
    def one(params=None) -> int:
        return params["n"]

    one()


minimal()
'''

CHILD = r"""
import json, sys, time
t = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
airflow_s = time.perf_counter() - t
bag = DagBag(dag_folder=sys.argv[1])
(stat,) = bag.dagbag_stats
print(json.dumps({"airflow_s": airflow_s, "file_s": stat.duration.total_seconds(), "dags": stat.dag_num,
                  "tasks": stat.task_num, "errors": bag.import_errors}))
"""


def parse(path: Path, home: str) -> dict:
    """One fresh process: Airflow's import and the file's parse, in seconds."""
    env = {**os.environ, "AIRFLOW_HOME": f"{home}/airflow", "DTM_HOME": home}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path)], env=env, capture_output=True, text=True,
                         check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    if row["errors"] or row["dags"] != 1:
        raise SystemExit(f"{path.name} did not parse to one DAG: {row['errors']}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    sys.path.insert(0, str(DAGS.parent))
    from dtm_ops.machine import cpu_model

    with tempfile.TemporaryDirectory(prefix="dtm-dag-parse-") as home:
        reference = Path(home) / "minimal_dag.py"
        reference.write_text(MINIMAL_DAG)
        files = [reference, *sorted(DAGS.glob("dtm_*.py"))]
        runs: dict[Path, list[dict]] = {f: [] for f in files}
        for _ in range(a.rounds):
            for f in files:
                runs[f].append(parse(f, home))
    median = {f: {k: statistics.median(r[k] for r in rs) for k in ("airflow_s", "file_s")} for f, rs in runs.items()}
    ref = median[reference]["file_s"]
    print(f"{cpu_model()}; {os.cpu_count()} CPUs: each file parsed by DagBag in a fresh process, "
          f"median of {a.rounds} rounds")
    print(f"  {'file':<22} {'tasks':>5} {'airflow import':>14} {'file parse':>10} {'x minimal':>9} "
          f"{'of ' + str(BUDGET_S) + ' s':>8}")
    for f in files:
        m = median[f]
        print(f"  {f.name:<22} {runs[f][0]['tasks']:>5} {m['airflow_s']:>12.2f} s {m['file_s'] * 1000:>7.0f} ms "
              f"{m['file_s'] / ref:>8.2f}x {m['file_s'] / BUDGET_S:>7.1%}")


if __name__ == "__main__":
    main()
