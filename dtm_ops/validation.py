"""Great Expectations gates (GX 1.x, ephemeral context, expectation suites as code).

Each gate flattens records into a table with a few derived columns (is the box inside its
frame? could the frame be read?), runs a suite over it, and maps every failed row back to
its record with a reason that names the field. Reports that fail go to quarantine; a result
set that fails blocks the push.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dtm_ops.reports import ERROR_TYPES, Quarantined, Report

log = logging.getLogger(__name__)


@dataclass
class Check:
    """One expectation and the reason given for a row that fails it."""

    make: Callable[[], object]  # builds the GX expectation (GX imported lazily)
    reason: Callable[[dict], str]


def _context():
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    return ctx


def run_suite(name: str, rows: list[dict], checks: Sequence[Check]) -> dict[int, list[str]]:
    """Run ``checks`` over ``rows`` with GX; returns ``{row index: [reasons]}`` of failed rows.

    Table-level failures (not tied to rows) are reported under index ``-1``.
    """
    import great_expectations as gx
    import pandas as pd

    if not rows:
        return {}
    ctx = _context()
    df = pd.DataFrame(rows)
    batch = ctx.data_sources.add_pandas(name).add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = gx.ExpectationSuite(name=name)
    for c in checks:
        suite.add_expectation(c.make())
    suite = ctx.suites.add(suite)
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=name, data=batch, suite=suite))
    result = vd.run(batch_parameters={"dataframe": df}, result_format={"result_format": "COMPLETE"})
    failed: dict[int, list[str]] = {}
    for check, r in zip(checks, result.results):
        if r.success:
            continue
        idx = r.result.get("unexpected_index_list")
        if idx is None:
            failed.setdefault(-1, []).append(check.reason({}))
            continue
        for i in idx:
            i = int(i["index"]) if isinstance(i, dict) else int(i)
            failed.setdefault(i, []).append(check.reason(rows[i]))
    return failed


# ---------------------------------------------------------------------------- reports
def _box_problem(boxes, width, height) -> str | None:
    from dtm_ops.boxes import validate_box
    from dtm_ops.errors import InputError

    if not isinstance(boxes, list) or not boxes:
        return "field 'boxes': expected a non-empty list of [x1, y1, x2, y2]"
    for i, b in enumerate(boxes):
        if width is None:
            return None
        try:
            validate_box(b, width, height, field=f"boxes[{i}]")
        except InputError as exc:
            return f"field 'boxes[{i}]': {exc.reason}"
    return None


def _frame_size(uri) -> tuple[int, int] | str:
    from dtm_ops.errors import DtmError
    from dtm_ops.media import open_image

    if not isinstance(uri, str) or not uri:
        return "field 'frame_uri': missing"
    try:
        return open_image(uri).size
    except DtmError as exc:
        return f"field 'frame_uri': frame cannot be read: {exc}"


def report_rows(reports: Sequence[Report]) -> list[dict]:
    """Flatten reports for the suite; reads each frame once to know its size."""
    rows = []
    for r in reports:
        size = _frame_size(r.frame_uri)
        frame_error = size if isinstance(size, str) else None
        w, h = (None, None) if frame_error else size
        problem = _box_problem(r.boxes, w, h)
        score_ok = r.score is None or (isinstance(r.score, (int, float)) and 0.0 <= r.score <= 1.0 and not math.isnan(r.score))
        rows.append(
            {
                "report_id": r.report_id,
                "frame_uri": r.frame_uri,
                "error_type": r.error_type,
                "class": r.cls,
                "frame_error": frame_error or "",
                "frame_readable": frame_error is None,
                "box_problem": problem or "",
                "boxes_ok": problem is None,
                "score_ok": bool(score_ok) and not (r.error_type == "false_negative" and r.score is not None),
                "score": r.score,
            }
        )
    return rows


def report_checks() -> list[Check]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Check(lambda: E.ExpectColumnValuesToNotBeNull(column="report_id"), lambda r: "field 'report_id': missing"),
        Check(lambda: E.ExpectColumnValuesToBeUnique(column="report_id"), lambda r: f"field 'report_id': {r.get('report_id')!r} is not unique"),
        Check(lambda: E.ExpectColumnValuesToNotBeNull(column="class"), lambda r: "field 'class': missing"),
        Check(
            lambda: E.ExpectColumnValuesToBeInSet(column="error_type", value_set=list(ERROR_TYPES)),
            lambda r: f"field 'error_type': {r.get('error_type')!r} is not one of {', '.join(ERROR_TYPES)}",
        ),
        Check(lambda: E.ExpectColumnValuesToBeInSet(column="frame_readable", value_set=[True]), lambda r: r["frame_error"]),
        Check(lambda: E.ExpectColumnValuesToBeInSet(column="boxes_ok", value_set=[True]), lambda r: r["box_problem"]),
        Check(
            lambda: E.ExpectColumnValuesToBeInSet(column="score_ok", value_set=[True]),
            lambda r: f"field 'score': {r.get('score')!r} must be in [0, 1] for a false positive and absent for a false negative",
        ),
    ]


def validate_reports(reports: Sequence[Report]) -> tuple[list[Report], list[Quarantined]]:
    """Split reports into those to mine and those to quarantine (with every reason)."""
    rows = report_rows(reports)
    failed = run_suite("reports", rows, report_checks())
    good = [r for i, r in enumerate(reports) if i not in failed]
    bad = [Quarantined(r.origin, r.to_json(), failed[i]) for i, r in enumerate(reports) if i in failed]
    return good, bad


# ---------------------------------------------------------------------------- results
def result_checks(top_k: int) -> list[Check]:
    import great_expectations as gx

    E = gx.expectations
    return [
        Check(lambda: E.ExpectColumnValuesToBeBetween(column="cosine", min_value=-1.0001, max_value=1.0001),
              lambda r: f"query {r.get('query_id')!r} frame {r.get('frame_id')!r}: field 'cosine' {r.get('cosine')} outside [-1, 1]"),
        Check(lambda: E.ExpectColumnValuesToBeBetween(column="rank", min_value=1, max_value=top_k),
              lambda r: f"query {r.get('query_id')!r}: field 'rank' {r.get('rank')} outside 1..{top_k}"),
        Check(lambda: E.ExpectCompoundColumnsToBeUnique(column_list=["query_id", "frame_id"]),
              lambda r: f"query {r.get('query_id')!r} frame {r.get('frame_id')!r}: more than one row"),
        Check(lambda: E.ExpectColumnValuesToBeInSet(column="box_inside", value_set=[True]),
              lambda r: f"query {r.get('query_id')!r} frame {r.get('frame_id')!r}: field 'box' {r.get('box')} not inside the frame"),
        Check(lambda: E.ExpectColumnValuesToNotBeNull(column="score"),
              lambda r: f"query {r.get('query_id')!r} frame {r.get('frame_id')!r}: field 'score' missing"),
    ]


def validate_results(records: Sequence[dict], frame_sizes: dict[str, tuple[int, int]], top_k: int) -> list[str]:
    """Problems with a result set (empty list: it may be pushed)."""
    rows = []
    for r in records:
        w, h = frame_sizes.get(r["frame_id"], (0, 0))
        b = r.get("box") or [0, 0, 0, 0]
        rows.append({**{k: r.get(k) for k in ("query_id", "frame_id", "rank", "score", "cosine")}, "box": b,
                     "box_inside": bool(0 <= b[0] < b[2] <= w + 1e-6 and 0 <= b[1] < b[3] <= h + 1e-6)})
    failed = run_suite("results", rows, result_checks(top_k))
    return [reason for i in sorted(failed) for reason in failed[i]]
