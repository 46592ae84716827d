"""Retrieval quality: DTM against the global-feature and ROI-pooled baselines, by ROI size.

Builds the two evaluation sets (seeded; see dtm_ops/evaluation/build.py) unless they exist,
runs the evaluation (``dtm eval run``) on each (every method in the same run, on the same frames), and prints
the tables and the ratios the issue asks about: DTM's precision@50 over the global
baseline's, per ROI-area bucket. Outputs go to ``--out`` (tables, per-query rows, plots, the
worst queries); ``--record`` also copies the tables and plots to benchmarks/results/.

    .venv/bin/python benchmarks/bench_retrieval.py [--labels ../shared/data/pseudo_labels.jsonl]
        [--out benchmark-output/retrieval] [--record] [dtm eval run options...]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from dtm_ops.evaluation.build import build_controlled_set, build_real_set
from dtm_ops.evaluation.runner import EvalConfig, evaluate, markdown_table

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", default=str(REPO.parent / "shared" / "data" / "pseudo_labels.jsonl"))
    p.add_argument("--out", default=str(REPO / "benchmark-output" / "retrieval"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--record", action="store_true", help="copy tables and plots to benchmarks/results/retrieval/")
    p.add_argument("--sets", default="controlled,real")
    a = p.parse_args()
    out = Path(a.out)
    for name in a.sets.split(","):
        set_dir = out / "sets" / name
        if not (set_dir / "set.json").exists():  # what `dtm eval build` writes
            if name == "real":
                build_real_set(set_dir, a.labels, seed=a.seed)
            else:
                build_controlled_set(set_dir, seed=a.seed)
        result = evaluate(set_dir, out / name, EvalConfig())
        print(f"\n## {name}\n")
        print(markdown_table(result["summary"]), end="")
        val = {(r["method"], r["bucket"]): r for r in result["summary"]}
        print("\nDTM / baseline, P@50 per bucket (> 1: DTM ahead):")
        for bucket in sorted({b for _, b in val}, key=lambda b: ["all", "<=0.5%", "0.5-1%", "1-3%", ">3%"].index(b)):
            d = val.get(("dtm", bucket))
            cells = []
            for base in ("global-avg", "global-gem", "roi-pooled"):
                g = val.get((base, bucket))
                if d and g:
                    cells.append(f"{base} {d['P@50'] / g['P@50']:.2f}x" if g["P@50"] else f"{base} inf")
            print(f"  {bucket:>7}: " + ", ".join(cells))
        if a.record:
            dest = REPO / "benchmarks" / "results" / "retrieval" / name
            dest.mkdir(parents=True, exist_ok=True)
            for f in ("summary.md", "summary.csv", "per_query.csv", "precision_by_area.png", "worst.png"):
                if (out / name / f).exists():
                    shutil.copy(out / name / f, dest / f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
