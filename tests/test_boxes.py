import math

import pytest

from dtm_ops.boxes import box_iou, box_to_cells, parse_box, validate_box
from dtm_ops.errors import InputError


def test_cells_follow_the_centre_rule_by_hand():
    # stride 32: x 40..100 holds centres 48 and 80 -> columns 1-2; y 0..31 holds centre 16 -> row 0
    assert box_to_cells((40, 0, 100, 31), 32, 10, 10) == (0, 1, 1, 2)
    # x 40..60 holds no centre: the cell of its centre (50 -> column 1), at least 1x1
    assert box_to_cells((40, 40, 60, 60), 32, 10, 10) == (1, 1, 1, 1)
    # a centre exactly on the edge counts: x 16..48 holds 16 and 48
    assert box_to_cells((16, 16, 48, 48), 32, 10, 10) == (0, 0, 2, 2)
    # clipped to the grid
    assert box_to_cells((0, 0, 1000, 1000), 32, 3, 4) == (0, 0, 3, 4)


def test_iou_by_hand():
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    assert box_iou((1, 2, 3, 4), (1, 2, 3, 4)) == 1.0


@pytest.mark.parametrize(
    "box,match",
    [
        ((10, 10, 5, 20), "empty or inverted"),
        ((10, 10, 10, 20), "empty or inverted"),
        ((0, 0, 700, 20), "outside the 640x480 image"),
        ((-5, 0, 20, 20), "outside"),
        ((0, math.nan, 20, 20), "non-finite"),
        ((1, 2, 3), "four numbers"),
    ],
)
def test_bad_boxes_name_source_record_and_field(box, match):
    with pytest.raises(InputError, match=match) as err:
        validate_box(box, 640, 480, source="q.jsonl", record="line 3", field="boxes[1]")
    assert "q.jsonl" in str(err.value) and "line 3" in str(err.value) and "'boxes[1]'" in str(err.value)


def test_small_overshoot_is_clipped():
    assert validate_box((-1.0, 0, 641.5, 480), 640, 480) == (0.0, 0.0, 640.0, 480.0)


def test_parse_box():
    assert parse_box("1, 2,3.5,4") == (1.0, 2.0, 3.5, 4.0)
    with pytest.raises(InputError, match="x1,y1,x2,y2"):
        parse_box("1,2,3", field="--box 1")
    with pytest.raises(InputError, match="four numbers"):
        parse_box("a,b,c,d")
