"""The mining DAG's trigger form: its ad-hoc query read by the run (``adhoc_from_form``), the
pattern the form checks the boxes against before a run starts (the two must agree), and
template scales given as text (the form's and ``--scales``), and which runs mine only new
report files (their type, or the form's tick)."""

from __future__ import annotations

import re

import pytest

from dtm_ops.errors import InputError
from dtm_ops.mining import MiningConfig, adhoc_from_form
from dtm_ops.scales import DEFAULT_SCALES, parse_scales
from dtm_ops.settings import BOXES_PATTERN

GOOD = ["268,10,535,212", " 268.0, 10.5 ,535 , 212 ", "1,2,3,4;5,6,7,8", "1,2,3,4; 5,6,7,8;", ".5,0,10.,20",
        "-1,-2,30,40", "+1,2,3,4"]
BAD = ["1,2,3", "1,2,3,4,5", "a,b,c,d", "1,2,3,4;;5,6,7,8", "1 2 3 4", "1,2,3,4;5,6", "1e2,0,300,40", "nan,0,1,1",
       ";1,2,3,4", "1,2,,4"]


def test_neither_frame_nor_boxes_is_no_adhoc_query():
    assert adhoc_from_form(None, None, None) is None
    assert adhoc_from_form("  ", "", "bicycle") is None


def test_boxes_are_read_as_numbers_and_the_class_defaults_to_object():
    report = adhoc_from_form(" s3://lake/f.jpg ", "1,2,3,4; 5.5,6,7,8;", " ")
    assert report["frame_uri"] == "s3://lake/f.jpg" and report["class"] == "object"
    assert report["boxes"] == [[1.0, 2.0, 3.0, 4.0], [5.5, 6.0, 7.0, 8.0]]
    assert adhoc_from_form("f.jpg", "1,2,3,4", "bicycle")["class"] == "bicycle"


@pytest.mark.parametrize("frame, boxes, field, wanted", [
    ("f.jpg", None, "boxes", "an ad-hoc query needs boxes on its frame"),
    ("f.jpg", " ", "boxes", "an ad-hoc query needs boxes on its frame"),
    (None, "1,2,3,4", "frame_uri", "an ad-hoc query needs the frame its boxes '1,2,3,4' are on"),
    ("f.jpg", "1,2,3,4;1,2,3", "boxes[1]", "expected 'x1,y1,x2,y2', got '1,2,3'"),
    ("f.jpg", "1,2,3,4;a,b,c,d", "boxes[1]", "expected four numbers, got 'a,b,c,d'"),
    ("f.jpg", ";1,2,3,4", "boxes[0]", "expected 'x1,y1,x2,y2', got ''"),
    ("f.jpg", "1e2,0,300,40", "boxes", "expected x1,y1,x2,y2 in plain decimals, got '1e2,0,300,40'"),
])
def test_a_half_filled_or_wrong_query_is_an_error_naming_the_field(frame, boxes, field, wanted):
    with pytest.raises(InputError) as err:
        adhoc_from_form(frame, boxes, None)
    assert str(err.value).startswith(f"trigger form: field '{field}': {wanted}")


@pytest.mark.parametrize("text", GOOD + BAD)
def test_the_forms_pattern_takes_exactly_the_boxes_the_run_reads(text):
    """What the form lets through never fails the run on its boxes, and what the run would
    refuse, the form refuses before the run starts."""
    by_form = re.search(BOXES_PATTERN, text) is not None
    try:
        by_run = adhoc_from_form("f.jpg", text, None) is not None
    except InputError as err:
        assert str(err).startswith("trigger form: field 'boxes"), err
        by_run = False
    assert by_form == by_run == (text in GOOD)


def test_an_empty_field_passes_the_forms_pattern():
    """The form sends an emptied field as "" or null: no ad-hoc query, not a form error."""
    assert re.search(BOXES_PATTERN, "") and re.search(BOXES_PATTERN, "  ")


@pytest.mark.parametrize("text, expected", [("1", (1.0,)), ("0.5, 1,2", (0.5, 1.0, 2.0)), (" .25,8 ", (0.25, 8.0))])
def test_scales_read_as_positive_numbers(text, expected):
    assert parse_scales(text, source="command line", field="--scales") == expected


@pytest.mark.parametrize("text", ["", "0", "1,0", "-1", "1,,2", "1;2", "nan", "1,inf", "x"])
def test_scales_that_are_not_positive_finite_numbers_name_the_field(text):
    with pytest.raises(InputError) as err:
        parse_scales(text, source="trigger form")
    assert str(err.value) == f"trigger form: field 'scales': expected positive numbers like 0.5,1,2, got {text!r}"


def test_the_forms_scales_reach_the_mining_config():
    params = {"scales": "0.5,1", "top_k": 3, "min_score": None, "mode": "any", "dedupe_window": 5}
    assert MiningConfig.from_params("f", params).scales == (0.5, 1.0)
    assert MiningConfig.from_params("f", {**params, "scales": " "}).scales is None  # the default ladder
    assert MiningConfig.from_params("f", {**params, "scales": None}).scales is None
    with pytest.raises(InputError, match="^trigger form: field 'scales': .* got '1,-2'$"):
        MiningConfig.from_params("f", {**params, "scales": "1,-2"})
    assert DEFAULT_SCALES[0] == 0.25 and DEFAULT_SCALES[-1] == 8.0 and len(DEFAULT_SCALES) == 11


def test_scheduled_asset_and_backfill_runs_mine_only_new_report_files_and_manual_ones_when_asked():
    """Against Airflow's own run-type enums (the task SDK's and the core's): they print as
    ``DagRunType.SCHEDULED`` and do not hash as their values."""
    from airflow.sdk.api.datamodels._generated import DagRunType as SdkRunType
    from airflow.utils.types import DagRunType as CoreRunType

    from dtm_ops.mining import only_new_reports

    for kind in (SdkRunType, CoreRunType, str):
        automatic = {t: only_new_reports(kind(t), False) for t in
                     ("scheduled", "asset_triggered", "backfill", "manual", "operator_triggered")}
        assert automatic == {"scheduled": True, "asset_triggered": True, "backfill": True, "manual": False,
                             "operator_triggered": False}, kind
        assert only_new_reports(kind("manual"), True) is True
