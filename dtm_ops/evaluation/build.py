"""Building the two evaluation sets from real footage and real photos (seeded, written to disk).

**Real-frame set** (``build_real_set``): every 4th frame of ``vtest.avi`` and every 2nd of
``bikes.mp4`` (the demo lake's sampling), plus real photos from Debian's ``opencv-doc`` as
distractors (picked by eye to hold no person, car or truck). Labels come from three real
detectors (``../shared/data/pseudo_labels.jsonl``): a box counts when two of the three
(CenterNet, NanoDet, OpenImages SSD) agree on its class with IoU > 0.5 at score >= 0.3; a
class that some detector reports at score >= 0.25 without such agreement is *uncertain* in
that frame (the frame is left out for that class). Queries are agreed boxes, picked at
random (seeded) per class and ROI-area bucket, from frames at least 10 s apart.

**Controlled set** (``build_controlled_set``): real object crops (persons from
``vtest.avi``, cars from ``bikes.mp4``; boxes from the same detectors, picked by eye)
pasted at known places and sizes into real photos that hold none of those classes. Every
paste is done alike (a feathered rectangular mask), and crops of other photos are pasted
the same way as distractors, so that a pasted look tells nothing about the class. Lake
and query use different object instances and different backgrounds; each query is one
instance pasted at one of four ROI areas (0.3%, 0.75%, 2%, 5% of the frame).
"""

from __future__ import annotations

import io
import json
import math
import random
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageFilter

from dtm_ops.boxes import box_iou
from dtm_ops.evaluation.sets import BUCKETS, EvalFrame, EvalQuery, EvalSet, Obj, area_bucket
from dtm_ops.fileio import atomic_write

PHOTOS = Path("/usr/share/doc/opencv-doc/examples/data")
#: opencv-doc photos with no person, car or truck in them (checked by eye).
BACKGROUNDS = [
    "aloeL.jpg", "aloeR.jpg", "apple.jpg", "baboon.jpg", "blox.jpg", "board.jpg", "box_in_scene.png", "building.jpg",
    "butterfly.jpg", "chicky_512.png", "ela_original.jpg", "fruits.jpg", "graf1.png", "graf3.png", "home.jpg",
    "leuvenA.jpg", "leuvenB.jpg", "orange.jpg", "rubberwhale1.png", "smarties.png", "squirrel_cls.jpg",
    "starry_night.jpg", "stuff.jpg", "sudoku.png", "left.jpg", "right.jpg",
]
CLASSES_REAL = ("person", "car", "truck")
OID = {"Person": "person", "Car": "car", "Truck": "truck", "Van": "truck", "Bus": "bus", "Bicycle": "bicycle",
       "Motorcycle": "motorcycle"}
FPS = {"vtest": 10.0, "bikes": 25.0}
STEPS = {"vtest": 4, "bikes": 2}

#: Object instances for the controlled set: (video, frame, box, class). Lake and query
#: instances are different objects (the query persons wear other clothes than the lake's).
#: Crops of bicycles all include their rider, so bicycles are left out.
LAKE_INSTANCES = [
    ("vtest", 190, (649, 230, 693, 326), "person"), ("vtest", 243, (640, 265, 680, 371), "person"),
    ("vtest", 206, (643, 285, 693, 397), "person"), ("vtest", 607, (524, 192, 560, 276), "person"),
    ("vtest", 258, (541, 246, 592, 344), "person"), ("vtest", 175, (460, 216, 505, 302), "person"),
    ("vtest", 480, (462, 239, 508, 331), "person"), ("vtest", 380, (561, 269, 613, 371), "person"),
    ("vtest", 790, (599, 263, 646, 370), "person"), ("vtest", 187, (538, 234, 572, 327), "person"),
    ("vtest", 227, (522, 279, 565, 389), "person"), ("vtest", 54, (641, 249, 686, 358), "person"),
    ("bikes", 155, (264, 92, 430, 183), "car"), ("bikes", 149, (510, 102, 622, 166), "car"),
    ("bikes", 165, (516, 103, 613, 158), "car"), ("bikes", 137, (294, 107, 417, 161), "car"),
    ("bikes", 186, (513, 97, 608, 159), "car"), ("bikes", 71, (21, 3, 634, 257), "car"),
]
QUERY_INSTANCES = [
    ("vtest", 592, (350, 319, 425, 436), "person"), ("vtest", 516, (612, 272, 651, 371), "person"),
    ("vtest", 629, (565, 273, 605, 369), "person"), ("vtest", 116, (465, 211, 506, 290), "person"),
    ("bikes", 19, (509, 0, 638, 44), "car"), ("bikes", 158, (2, 87, 157, 176), "car"),
    ("bikes", 166, (67, 100, 193, 168), "car"), ("bikes", 186, (0, 90, 109, 244), "car"),
]
QUERY_AREAS = (0.003, 0.0075, 0.02, 0.05)
CANVAS = (640, 480)


def _save_jpeg(img: Image.Image, path: Path) -> None:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=95)
    atomic_write(path, buf.getvalue())


def _videos() -> dict[str, str]:
    from dtm_ops.demo import demo_videos

    videos = demo_videos()
    if "vtest" not in videos:
        raise FileNotFoundError("the evaluation sets need vtest.avi (Debian package opencv-doc)")
    return videos


def _labels(path: str | Path) -> dict[tuple[str, int], dict]:
    out = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out[(r["video"].split(".")[0], int(r["frame"]))] = r
    return out


def voted_objects(record: dict, classes=CLASSES_REAL, score: float = 0.3) -> tuple[list[Obj], list[str]]:
    """Boxes on which two of the three detectors agree (class, IoU > 0.5, score >= ``score``),
    and the classes reported without agreement (uncertain)."""
    dets = {
        "centernet": [(c, b) for c, s, b in record.get("centernet", []) if s >= score],
        "nanodet": [(c, b) for c, s, b in record.get("nanodet", []) if s >= score],
        "oid_ssd": [(OID.get(c, c.lower()), b) for c, s, b in record.get("oid_ssd", []) if s >= score],
    }
    weak = {OID.get(c, c.lower()) if d == "oid_ssd" else c
            for d in ("centernet", "nanodet", "oid_ssd") for c, s, _ in record.get(d, []) if s >= 0.25}
    objects: list[Obj] = []
    names = list(dets)
    for name in names:
        for c, b in dets[name]:
            if c not in classes:
                continue
            votes = 1 + sum(any(c2 == c and box_iou(b, b2) > 0.5 for c2, b2 in dets[o]) for o in names if o != name)
            if votes >= 2 and not any(o.cls == c and box_iou(o.box, b) > 0.5 for o in objects):
                objects.append(Obj(c, [float(v) for v in b]))
    uncertain = sorted((weak & set(classes)) - {o.cls for o in objects})
    return objects, uncertain


# ----------------------------------------------------------------------------- real frames
def build_real_set(out: str | Path, labels: str | Path, *, seed: int = 0, per_bucket: int = 4,
                   exclude_seconds: float = 3.0) -> EvalSet:
    from dtm_ops.media import iter_video

    out = Path(out)
    rng = random.Random(seed)
    lab = _labels(labels)
    frames: list[EvalFrame] = []
    sizes: dict[str, tuple[int, int]] = {}  # video frames (query candidates) -> (width, height)
    for name, path in _videos().items():
        for idx, image in iter_video(path, step=STEPS[name]):
            rel = f"images/{name}/{idx:06d}.jpg"
            _save_jpeg(image, out / rel)
            objects, uncertain = voted_objects(lab.get((name, idx), {}))
            frames.append(EvalFrame(f"{name}/{idx:06d}", rel, name, idx, idx / FPS[name], objects, uncertain))
            sizes[frames[-1].frame_id] = image.size
    for i, photo in enumerate(BACKGROUNDS):
        rel = f"images/photos/{Path(photo).stem}.jpg"
        _save_jpeg(Image.open(PHOTOS / photo), out / rel)
        frames.append(EvalFrame(f"photos/{Path(photo).stem}", rel, f"photos/{Path(photo).stem}", 0, None))
    # candidate queries: agreed boxes not overlapping another box of their class, >= 12 px a side
    cands: dict[tuple[str, str], list[tuple[EvalFrame, Obj, float]]] = defaultdict(list)
    for f in frames:
        if f.frame_id not in sizes:
            continue
        w, h = sizes[f.frame_id]
        for o in f.objects:
            bw, bh = o.box[2] - o.box[0], o.box[3] - o.box[1]
            if min(bw, bh) < 12 or any(p is not o and p.cls == o.cls and box_iou(p.box, o.box) > 0.1 for p in f.objects):
                continue
            area = bw * bh / (w * h)
            cands[(o.cls, area_bucket(area))].append((f, o, area))
    queries: list[EvalQuery] = []
    for (cls, bucket) in sorted(cands):
        pool = cands[(cls, bucket)]
        rng.shuffle(pool)
        chosen: list[tuple[EvalFrame, Obj, float]] = []
        for f, o, area in pool:
            if all(f.sequence != g.sequence or abs(f.time_s - g.time_s) >= 10.0 for g, _, _ in chosen):
                chosen.append((f, o, area))
            if len(chosen) == per_bucket:
                break
        for k, (f, o, area) in enumerate(chosen):
            queries.append(EvalQuery(f"{cls}-{bucket}-{k}", f.image, o.box, cls, f.sequence, f.time_s, area))
    meta = {"name": "real-frames", "kind": "real", "seed": seed, "exclude_seconds": exclude_seconds,
            "classes": list(CLASSES_REAL),
            "labels": "two of three real detectors agree (class, IoU > 0.5, score >= 0.3); a class seen by one "
                      "detector only (score >= 0.25) is uncertain in that frame and left out; photos hold none by eye"}
    es = EvalSet(out, meta, frames, queries)
    es.save()
    return es


# ----------------------------------------------------------------------------- controlled
def _canvas(photo: str, rng: random.Random) -> Image.Image:
    """A background photo cropped at random (90% of its side, 4:3) and resized to the canvas."""
    img = Image.open(PHOTOS / photo).convert("RGB")
    w, h = img.size
    cw = min(w, h * 4 / 3) * 0.9
    ch = cw * 3 / 4
    x, y = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    img = img.crop((round(x), round(y), round(x + cw), round(y + ch))).resize(CANVAS, Image.BICUBIC)
    return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else img


def _mask(size: tuple[int, int]) -> Image.Image:
    """Feathered rectangle: opaque inside, fading over the outer ~12% of each side."""
    w, h = size
    m = Image.new("L", (w, h), 0)
    bx, by = max(1, round(w * 0.12)), max(1, round(h * 0.12))
    m.paste(255, (bx // 2, by // 2, w - bx // 2, h - by // 2))
    return m.filter(ImageFilter.GaussianBlur(max(0.5, min(bx, by) / 3)))


def paste(canvas: Image.Image, crop: Image.Image, area: float, rng: random.Random,
          avoid: list[list[float]] = ()) -> list[float]:
    """Paste ``crop`` scaled to ``area`` of the canvas at a random free place; its box."""
    W, H = canvas.size
    aspect = crop.width / crop.height
    h = math.sqrt(area * W * H / aspect)
    w = h * aspect
    if w > W * 0.95 or h > H * 0.95:  # too large for the canvas: shrink to fit
        f = min(W * 0.95 / w, H * 0.95 / h)
        w, h = w * f, h * f
    w, h = max(4, round(w)), max(4, round(h))
    for _ in range(50):
        x, y = rng.randint(0, W - w), rng.randint(0, H - h)
        box = [float(x), float(y), float(x + w), float(y + h)]
        if all(box_iou(box, a) == 0 for a in avoid):
            break
    piece = crop.resize((w, h), Image.BICUBIC)
    canvas.paste(piece, (x, y), _mask((w, h)))
    return box


def build_controlled_set(out: str | Path, *, seed: int = 0, variants: int = 12, lake_backgrounds: int = 20,
                         queries_per_cell: int = 3) -> EvalSet:
    from dtm_ops.media import read_video_frame

    out = Path(out)
    rng = random.Random(seed)
    videos = _videos()
    crops = {}
    for inst in LAKE_INSTANCES + QUERY_INSTANCES:
        video, frame, box, _ = inst
        crops[inst] = read_video_frame(videos[video], frame).crop(box)
    backgrounds = BACKGROUNDS[:]
    rng.shuffle(backgrounds)
    lake_bgs, query_bgs = backgrounds[:lake_backgrounds], backgrounds[lake_backgrounds:]
    by_class: dict[str, list] = defaultdict(list)
    for inst in LAKE_INSTANCES:
        by_class[inst[3]].append(inst)
    classes = sorted(by_class)
    frames: list[EvalFrame] = []
    for bg in lake_bgs:
        seq = Path(bg).stem
        for v in range(variants):
            canvas = _canvas(bg, rng)
            objects: list[Obj] = []
            if v > 0:  # variant 0: the background alone
                n = rng.choices([0, 1, 2], weights=[0.4, 0.45, 0.15])[0]
                for cls in rng.sample(classes, k=min(n, len(classes))):
                    inst = rng.choice(by_class[cls])
                    area = math.exp(rng.uniform(math.log(0.0015), math.log(0.08)))
                    objects.append(Obj(cls, paste(canvas, crops[inst], area, rng, [o.box for o in objects])))
                if rng.random() < 0.6:  # a distractor: a piece of another photo, pasted alike
                    other = Image.open(PHOTOS / rng.choice(query_bgs)).convert("RGB")
                    pw, ph = rng.randint(40, other.width // 2), rng.randint(40, other.height // 2)
                    px, py = rng.randint(0, other.width - pw), rng.randint(0, other.height - ph)
                    area = math.exp(rng.uniform(math.log(0.0015), math.log(0.08)))
                    paste(canvas, other.crop((px, py, px + pw, py + ph)), area, rng, [o.box for o in objects])
            rel = f"images/lake/{seq}/{v:04d}.jpg"
            _save_jpeg(canvas, out / rel)
            frames.append(EvalFrame(f"{seq}/{v:04d}", rel, seq, v, None, objects))
    queries: list[EvalQuery] = []
    q_by_class: dict[str, list] = defaultdict(list)
    for inst in QUERY_INSTANCES:
        q_by_class[inst[3]].append(inst)
    for cls in classes:
        for area in QUERY_AREAS:
            insts = rng.sample(q_by_class[cls], k=min(queries_per_cell, len(q_by_class[cls])))
            for k, inst in enumerate(insts):
                canvas = _canvas(rng.choice(query_bgs), rng)
                box = paste(canvas, crops[inst], area, rng)
                qid = f"{cls}-{area * 100:g}pct-{k}"
                rel = f"images/queries/{qid}.jpg"
                _save_jpeg(canvas, out / rel)
                real_area = (box[2] - box[0]) * (box[3] - box[1]) / (CANVAS[0] * CANVAS[1])
                queries.append(EvalQuery(qid, rel, box, cls, None, None, real_area))
    meta = {"name": "controlled", "kind": "controlled", "seed": seed, "exclude_seconds": 0.0, "classes": classes,
            "buckets": [b[0] for b in BUCKETS],
            "labels": "exact: real object crops pasted at known boxes into real photos that hold none of the classes; "
                      "lake and queries use different instances and backgrounds; distractor pieces of other photos "
                      "pasted alike"}
    es = EvalSet(out, meta, frames, queries)
    es.save()
    return es
