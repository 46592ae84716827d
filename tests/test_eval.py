"""The retrieval evaluation: metrics against values computed by hand, the set rules, the
centring and scale rules of the engine, and a planted end-to-end run."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dtm_ops.centering import center, mean_cell
from dtm_ops.evaluation.metrics import average_precision, localisation, precision_at_k
from dtm_ops.evaluation.rankers import rerank
from dtm_ops.evaluation.sets import EvalFrame, EvalQuery, EvalSet, Obj, area_bucket


def test_precision_and_average_precision_by_hand():
    ranked = ["a", "b", "c", "d", "e"]
    relevant = {"a", "c", "x"}  # x is never ranked
    assert [precision_at_k(ranked, relevant, k) for k in (1, 2, 5, 10)] == [1.0, 0.5, 0.4, 0.2]
    assert average_precision(ranked, relevant) == pytest.approx((1 / 1 + 2 / 3) / 3)
    assert average_precision(["c", "a"], {"a", "c"}) == 1.0
    assert math.isnan(average_precision(ranked, set()))


def test_localisation_counts_relevant_hits_with_iou_at_least_half():
    gt = {"a": [[0, 0, 10, 10]], "b": [[0, 0, 10, 10], [50, 50, 60, 60]]}
    ranked = [("a", [0, 0, 10, 10]), ("z", [0, 0, 10, 10]), ("b", [52, 50, 62, 60]), ("c", None)]
    # a: IoU 1; z: not relevant; b: IoU 80/120 = 0.67 with its second box
    assert localisation(ranked, gt) == (2, 2)
    assert localisation([("a", [5, 0, 15, 10])], gt) == (0, 1)  # IoU 50/150 = 0.33


@pytest.mark.parametrize("area,bucket", [(0.001, "<=0.5%"), (0.005, "<=0.5%"), (0.0051, "0.5-1%"), (0.01, "0.5-1%"),
                                         (0.02, "1-3%"), (0.03, "1-3%"), (0.2, ">3%")])
def test_area_buckets(area, bucket):
    assert area_bucket(area) == bucket


def test_candidates_leave_out_the_query_neighbourhood_and_uncertain_frames(tmp_path):
    frames = [EvalFrame(f"s/{i}", "x.jpg", "s", i, i / 10, [Obj("person", [0, 0, 1, 1])]) for i in range(100)]
    frames.append(EvalFrame("t/0", "x.jpg", "t", 0, 0.0, ignore=["person"]))
    frames.append(EvalFrame("t/1", "x.jpg", "t", 1, 0.1, ignore=["car"]))
    es = EvalSet(tmp_path, {"exclude_seconds": 3.0}, frames, [])
    q = EvalQuery("q", "x.jpg", [0, 0, 1, 1], "person", "s", 5.0, 0.01)
    ids = {f.frame_id for f in es.candidates(q)}
    assert ids == {f"s/{i}" for i in range(100) if abs(i / 10 - 5.0) > 3.0} | {"t/1"}


def test_rerank_puts_the_shortlist_first_in_the_second_order():
    first = torch.tensor([0.9, 0.8, 0.7, 0.1, 0.05], dtype=torch.float64)
    second = torch.tensor([0.0, 5.0, 1.0, 9.0, 0.0], dtype=torch.float64)
    order = torch.argsort(rerank(first, second, 3), descending=True).tolist()
    assert order == [1, 2, 0, 3, 4]


def test_centring_removes_the_common_part_and_keeps_padding_zero():
    mu = torch.tensor([1.0, 0.0, 0.0])
    bland_a = torch.nn.functional.normalize(torch.tensor([1.0, 0.1, 0.0]), dim=0)
    bland_b = torch.nn.functional.normalize(torch.tensor([1.0, 0.0, 0.1]), dim=0)
    x = torch.stack([bland_a, bland_b, torch.zeros(3)], dim=1)[:, :, None]  # Tensor[C=3, 3 cells, 1]
    plain = (x[:, 0] * x[:, 1]).sum()
    c = center(x, mu, dim=0)
    # by hand: a - mu = (1/sqrt(1.01) - 1, 0.1/sqrt(1.01), 0) -> unit (-0.04981, 0.99876, 0); b alike on
    # the third axis; their cosine falls from 0.990 to 0.04981^2
    assert plain == pytest.approx(1 / 1.01, abs=1e-6)
    assert (c[:, 0] * c[:, 1]).sum().item() == pytest.approx(0.002481, abs=2e-6)
    assert torch.all(c[:, 2] == 0) and torch.allclose(c[:, :2].norm(dim=0), torch.ones(2, 1))
    feats = torch.stack([x, x])  # Tensor[2, 3, 3, 1]: mean over valid cells (2 rows of 3)
    m = mean_cell([(feats, torch.tensor([[2, 1], [2, 1]]))])
    assert torch.allclose(m, (bland_a + bland_b) / 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_centring_equals_a_cell_by_cell_loop(dtype):
    g = torch.Generator().manual_seed(3)
    x = torch.nn.functional.normalize(torch.randn(2, 6, 4, 5, generator=g), dim=1)
    x[0, :, 3:, :] = 0  # padding
    x[1, :, :, 4:] = 0
    x = x.to(dtype)
    mu = torch.randn(6, generator=g) * 0.3
    got = center(x, mu, dim=1)
    assert got.dtype == dtype and got.shape == x.shape
    for n in range(2):
        for i in range(4):
            for j in range(5):
                cell = x[n, :, i, j].double()
                want = torch.zeros(6, dtype=torch.float64)
                if cell.abs().max() > 0:
                    want = (cell - mu.double()) / (cell - mu.double()).norm()
                torch.testing.assert_close(got[n, :, i, j].double(), want, atol=1e-6 if dtype == torch.float32 else 1e-3,
                                           rtol=0)


def test_templates_never_come_from_an_image_enlarged_past_max_upsample(random_extractor):
    from dtm_ops.templates import feasible_scales

    box = (100.0, 100.0, 120.0, 140.0)  # small ROI on a 640x480 image (frame scale 128/640 = 0.2)
    scales = (0.5, 1.0, 2.0, 4.0, 8.0)
    all_ = feasible_scales(box, (640, 480), random_extractor, scales, max_upsample=100)
    capped = feasible_scales(box, (640, 480), random_extractor, scales, max_upsample=0.8)
    assert 8.0 in all_ and capped == [s for s in all_ if s * 0.2 <= 0.8]


@pytest.mark.slow
def test_planted_instance_is_found_first_and_placed_by_dtm(tmp_path, extractor, bikes_frames):
    """A set made by hand: a real crop (the parked bicycle) pasted at the query's size into 2
    of 8 real frames; DTM ranks those two first and places them, and every output exists."""
    from dtm_ops.evaluation.runner import EvalConfig, evaluate

    crop = bikes_frames[220].crop((268, 10, 535, 212)).resize((134, 101))
    frames, root = [], tmp_path / "set"
    (root / "images").mkdir(parents=True)
    for k, idx in enumerate([0, 10, 20, 40, 60, 100, 150, 180]):
        img = bikes_frames[idx].copy()
        objects = []
        if k in (2, 5):
            x, y = 60 + 40 * k, 30 + 10 * k
            img.paste(crop, (x, y))
            objects = [Obj("bicycle", [x, y, x + 134, y + 101])]
        img.save(root / "images" / f"{k}.jpg", quality=95)
        frames.append(EvalFrame(f"lake/{k}", f"images/{k}.jpg", f"seq{k}", 0, None, objects))
    q = bikes_frames[240].copy()
    q.paste(crop, (300, 100))
    q.save(root / "images" / "q.jpg", quality=95)
    query = EvalQuery("planted", "images/q.jpg", [300, 100, 434, 201], "bicycle", None, None, 134 * 101 / (640 * 272))
    EvalSet(root, {"name": "planted", "exclude_seconds": 0}, frames, [query]).save()

    out = tmp_path / "out"
    result = evaluate(root, out, EvalConfig(methods=("dtm", "global-avg", "roi-pooled")))
    rows = {r["method"]: r for r in result["rows"]}
    assert rows["dtm"]["P@10"] == pytest.approx(0.2) and rows["dtm"]["AP"] == 1.0  # both planted frames first
    assert (rows["dtm"]["loc_good"], rows["dtm"]["loc_total"]) == (2, 2)
    with open(out / "per_query.csv") as f:
        assert {r["method"] for r in csv.DictReader(f)} == {"dtm", "global-avg", "roi-pooled"}
    assert "| dtm | all | 1 |" in (out / "summary.md").read_text()
    assert Image.open(out / "precision_by_area.png").size[0] > 0
    assert Path(out / "worst.png").is_file()


def test_calibration_leaves_out_the_query_sequence_by_the_reference_loop():
    """10 frames of the query's own sequence hold the template itself, 10 others do not.
    Calibrated against the others only, mu is the median of their best scores, computed by
    the explicit loop; without the rule, the template's own frames pull the median up."""
    import numpy as np

    from dtm_ops.calibration import calibrate
    from dtm_ops.templates import Template
    from tests.reference import patchwise_cosine_loop, unit_cells

    rng = np.random.default_rng(7)
    tmpl = unit_cells(rng, (8, 2, 2))
    frames = np.stack([unit_cells(rng, (8, 5, 6)) for _ in range(20)])
    frames[:12, :, 1:3, 2:4] = tmpl  # the object in 12 frames: 10 of its own sequence, 2 others
    seqs = ["own"] * 10 + ["other"] * 10
    best = [patchwise_cosine_loop(f, tmpl, (5, 6)).max() for f in frames]

    def mu(skip):
        t = Template("q", 0, 1.0, torch.from_numpy(tmpl).float(), (0, 0, 2, 2))
        batch = (torch.from_numpy(frames).float(), torch.tensor([[5, 6]] * 20), seqs)
        calibrate([t], [batch], skip=skip)
        return t.mu

    # the lower median (torch's convention): the (n-1)//2-th smallest
    assert mu(["own"]) == pytest.approx(sorted(best[10:])[4], abs=1e-5)
    assert sorted(best)[9] == pytest.approx(1.0)  # 12 of the 20 frames hold the object
    assert mu(None) == pytest.approx(1.0, abs=1e-5)
    assert mu(["own"]) < 0.6
