"""Planted objects: real crops pasted at known places and scales into real frames.

The truth is exact: we know which frames hold which object, where and at what size.
Queries use the object's own frame (not in the lake) and its box there.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
from PIL import Image

from dtm_ops.boxes import box_iou
from dtm_ops.features import FrameFeatures
from dtm_ops.search import Query, Searcher
from dtm_ops.store.format import FrameEntry
from dtm_ops.store import FeatureStore

pytestmark = pytest.mark.slow

# (source frame of bikes.mp4, box): a taxi's roof sign and a cyclist, checked by eye.
OBJECTS = {"taxi_sign": (70, (90.0, 108.0, 365.0, 175.0)), "cyclist": (120, (346.0, 10.0, 527.0, 272.0))}
# Backgrounds: shots that hold neither object (see conftest.BIKES_SHOTS).
BACKGROUNDS = list(range(0, 30, 4)) + list(range(140, 188, 6)) + list(range(190, 242, 6))
# Planted frames: scale of each object relative to its query box.
PLANTS: dict[int, dict[str, float]] = {
    0: {"taxi_sign": 0.35},
    8: {"taxi_sign": 0.7},
    146: {"taxi_sign": 1.0},
    170: {"taxi_sign": 1.4},
    196: {"taxi_sign": 0.5},
    4: {"cyclist": 0.5},
    152: {"cyclist": 1.0},
    208: {"cyclist": 0.7},
    226: {"cyclist": 0.35},
    16: {"taxi_sign": 0.5, "cyclist": 0.5},
    164: {"taxi_sign": 0.7, "cyclist": 0.7},
    232: {"taxi_sign": 1.0, "cyclist": 0.35},
}


def _plant(frames) -> tuple[dict[int, Image.Image], dict[tuple[int, str], tuple[float, float, float, float]]]:
    rng = random.Random(7)
    images, truth = {}, {}
    for idx in BACKGROUNDS:
        im = frames[idx].copy()
        taken: list[tuple[float, float, float, float]] = []
        for name, scale in PLANTS.get(idx, {}).items():
            src, box = OBJECTS[name]
            crop = frames[src].crop(tuple(int(v) for v in box))
            w, h = round(crop.width * scale), round(crop.height * scale)
            for _ in range(100):  # place without overlapping the other planted object
                x, y = rng.randint(0, im.width - w), rng.randint(0, im.height - h)
                cand = (float(x), float(y), float(x + w), float(y + h))
                if all(box_iou(cand, t) == 0 for t in taken):
                    break
            im.paste(crop.resize((w, h), Image.Resampling.BILINEAR), (x, y))
            taken.append(cand)
            truth[(idx, name)] = cand
        images[idx] = im
    return images, truth


@pytest.fixture(scope="module")
def planted(tmp_path_factory, bikes_frames, extractor):
    images, truth = _plant(bikes_frames)
    root = tmp_path_factory.mktemp("planted")
    entries, feats = [], []
    for idx, im in images.items():
        path = root / "frames" / f"{idx:06d}.png"
        path.parent.mkdir(exist_ok=True)
        im.save(path)
        ff: FrameFeatures = extractor.extract([im])[0]
        entries.append(FrameEntry(f"planted/{idx:06d}", str(path), "planted", idx, im.width, im.height, ff.valid, ff.scale))
        feats.append(ff.features)
    store = FeatureStore.open(root / "features")
    store.append(extractor.fingerprint, entries, feats)
    queries = {}
    for name, (src, box) in OBJECTS.items():
        qpath = root / f"query_{name}.png"
        bikes_frames[src].save(qpath)
        queries[name] = (str(qpath), box)
    return store, truth, queries


def _frames_with(truth, *names):
    return {idx for idx in BACKGROUNDS if all((idx, n) in truth for n in names)}


@pytest.mark.parametrize("name", sorted(OBJECTS))
def test_planted_frames_rank_first_and_boxes_overlap(planted, extractor, name):
    store, truth, queries = planted
    path, box = queries[name]
    want = _frames_with(truth, name)
    hits = Searcher(extractor, top_k=len(want)).search(store, [Query(name, path, [box])], heatmaps=False)[name]
    got = {h.index for h in hits}
    assert got == want, f"{name}: top-{len(want)} {sorted(got)} != planted {sorted(want)}"
    for h in hits:
        iou = box_iou(h.box, truth[(h.index, name)])
        assert iou >= 0.5, f"{name} in frame {h.index}: IoU {iou:.2f} of {h.box} with {truth[(h.index, name)]}"


def test_calibration_removes_the_small_scale_bias_and_keeps_the_right_scale(planted, extractor):
    """Raw cosine (no calibration) lets the smallest template win on frames without the
    object; calibrated scores do not, and still pick the planted scale where it is."""
    store, truth, queries = planted
    for name, (path, box) in queries.items():
        chosen = {}
        for mode, frames in (("calibrated", 64), ("raw", 0)):
            searcher = Searcher(extractor, top_k=len(BACKGROUNDS), calibration_frames=frames)
            hits = searcher.search(store, [Query(name, path, [box])], heatmaps=False)[name]
            assert len(hits) == len(BACKGROUNDS)
            chosen[mode] = {h.index: h.scale for h in hits}
        clean = [i for i in BACKGROUNDS if (i, name) not in truth]
        smallest = min(chosen["raw"].values())
        raw_small = sum(chosen["raw"][i] == smallest for i in clean)
        cal_top_share = max(Counter(chosen["calibrated"][i] for i in clean).values())
        right = sum(
            abs(math.log(chosen["calibrated"][i] / PLANTS[i][name])) <= math.log(2) / 2 + 1e-6
            for i in BACKGROUNDS
            if (i, name) in truth
        )
        planted_n = sum((i, name) in truth for i in BACKGROUNDS)
        print(f"{name}: raw picks the smallest scale on {raw_small}/{len(clean)} clean frames; "
              f"calibrated: most common scale on {cal_top_share}/{len(clean)}; right scale on {right}/{planted_n} planted")
        assert raw_small >= 0.8 * len(clean)
        assert cal_top_share <= 0.5 * len(clean)
        assert right >= 0.8 * planted_n


def test_all_mode_needs_every_object_and_any_mode_takes_either(planted, extractor, bikes_frames, tmp_path):
    store, truth, _ = planted
    # The query: both objects planted at full size into a real frame that is not in the lake.
    canvas = bikes_frames[2].copy()
    boxes = []
    for name, at in (("taxi_sign", (0, 0)), ("cyclist", (420, 8))):
        src, box = OBJECTS[name]
        crop = bikes_frames[src].crop(tuple(int(v) for v in box))
        canvas.paste(crop, at)
        boxes.append((float(at[0]), float(at[1]), float(at[0] + crop.width), float(at[1] + crop.height)))
    qpath = tmp_path / "both.png"
    canvas.save(qpath)
    both = _frames_with(truth, "taxi_sign", "cyclist")
    either = _frames_with(truth, "taxi_sign") | _frames_with(truth, "cyclist")
    s_all = Searcher(extractor, top_k=len(both)).search(store, [Query("all", str(qpath), boxes, mode="all")], heatmaps=False)
    assert {h.index for h in s_all["all"]} == both
    for h in s_all["all"]:
        for m in h.rois:
            name = ["taxi_sign", "cyclist"][m.roi_index]
            assert box_iou(m.box, truth[(h.index, name)]) >= 0.5
    s_any = Searcher(extractor, top_k=len(either)).search(store, [Query("any", str(qpath), boxes, mode="any")], heatmaps=False)
    assert {h.index for h in s_any["any"]} == either
