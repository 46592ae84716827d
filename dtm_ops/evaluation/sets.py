"""Evaluation sets on disk: a lake of frames with ground-truth boxes, and queries.

A set is a folder (self-contained: its images are inside, so numbers reproduce exactly)::

    set.json        name, kind, seed, exclude_seconds, classes, how the labels were made
    frames.jsonl    one lake frame per line
    queries.jsonl   one query per line
    images/...      the frames' and queries' images (JPEG)

``frames.jsonl`` lines::

    {"frame_id": "vtest/000100", "image": "images/vtest/000100.jpg", "sequence": "vtest",
     "index": 100, "time_s": 10.0,
     "objects": [{"class": "person", "box": [x1, y1, x2, y2]}, ...],
     "ignore": ["car"]}

``ignore`` lists classes whose presence in the frame is uncertain (some detector saw one,
too weakly or alone): for queries of those classes the frame is left out of the ranking,
counted neither relevant nor irrelevant. ``time_s`` is ``null`` for still images.

``queries.jsonl`` lines::

    {"query_id": "person-0.5-1", "image": "images/queries/q.jpg", "box": [x1, y1, x2, y2],
     "class": "person", "sequence": "vtest", "time_s": 12.0, "area": 0.0071}

``area`` is the box's share of its image. A lake frame is *relevant* to a query when it
holds an object of the query's class; frames of the query's own sequence within
``exclude_seconds`` of it are left out (near-duplicates make retrieval trivial).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dtm_ops.errors import InputError
from dtm_ops.fileio import atomic_write

#: ROI area buckets (share of the frame), as in the issue and the paper's small-object claim.
BUCKETS: tuple[tuple[str, float, float], ...] = (
    ("<=0.5%", 0.0, 0.005),
    ("0.5-1%", 0.005, 0.01),
    ("1-3%", 0.01, 0.03),
    (">3%", 0.03, 1.0),
)


def area_bucket(area: float) -> str:
    for name, lo, hi in BUCKETS:
        if lo < area <= hi or (lo == 0.0 and area <= hi):
            return name
    return BUCKETS[-1][0]


@dataclass
class Obj:
    cls: str
    box: list[float]


@dataclass
class EvalFrame:
    frame_id: str
    image: str  # relative to the set's folder
    sequence: str
    index: int
    time_s: float | None
    objects: list[Obj] = field(default_factory=list)
    ignore: list[str] = field(default_factory=list)

    def classes(self) -> set[str]:
        return {o.cls for o in self.objects}

    def to_json(self) -> dict:
        d = asdict(self)
        d["objects"] = [{"class": o.cls, "box": [round(v, 2) for v in o.box]} for o in self.objects]
        return d


@dataclass
class EvalQuery:
    query_id: str
    image: str
    box: list[float]
    cls: str
    sequence: str | None
    time_s: float | None
    area: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        d["box"] = [round(v, 2) for v in self.box]
        return d


@dataclass
class EvalSet:
    root: Path
    meta: dict
    frames: list[EvalFrame]
    queries: list[EvalQuery]

    @property
    def exclude_seconds(self) -> float:
        return float(self.meta.get("exclude_seconds", 0.0))

    def path(self, rel: str) -> str:
        return str(self.root / rel)

    def candidates(self, q: EvalQuery) -> list[EvalFrame]:
        """The lake frames a query is judged on: not near it in its own sequence, and not
        uncertain for its class."""
        out = []
        for f in self.frames:
            if q.cls in f.ignore:
                continue
            if q.sequence is not None and f.sequence == q.sequence:
                if q.time_s is None or f.time_s is None or abs(f.time_s - q.time_s) <= self.exclude_seconds:
                    continue
            out.append(f)
        return out

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {**self.meta, "frames": len(self.frames), "queries": len(self.queries)}
        atomic_write(self.root / "frames.jsonl", "".join(json.dumps(f.to_json()) + "\n" for f in self.frames).encode())
        atomic_write(self.root / "queries.jsonl", "".join(json.dumps(q.to_json()) + "\n" for q in self.queries).encode())
        atomic_write(self.root / "set.json", json.dumps(meta, indent=1).encode())

    @classmethod
    def load(cls, root: str | Path) -> "EvalSet":
        root = Path(root)
        if not (root / "set.json").is_file():
            raise InputError("not an evaluation set (no set.json)", source=str(root), field="set")
        meta = json.loads((root / "set.json").read_text())
        frames, queries = [], []
        for n, line in enumerate((root / "frames.jsonl").read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                frames.append(EvalFrame(frame_id=d["frame_id"], image=d["image"], sequence=d["sequence"], index=int(d["index"]),
                                        time_s=d.get("time_s"), ignore=list(d.get("ignore", [])),
                                        objects=[Obj(o["class"], [float(v) for v in o["box"]]) for o in d.get("objects", [])]))
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"bad frame record ({exc!r})", source=f"{root}/frames.jsonl", record=n) from None
        for n, line in enumerate((root / "queries.jsonl").read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                queries.append(EvalQuery(query_id=d["query_id"], image=d["image"], box=[float(v) for v in d["box"]],
                                         cls=d["class"], sequence=d.get("sequence"), time_s=d.get("time_s"), area=float(d["area"])))
            except (KeyError, TypeError, ValueError) as exc:
                raise InputError(f"bad query record ({exc!r})", source=f"{root}/queries.jsonl", record=n) from None
        return cls(root, meta, frames, queries)
