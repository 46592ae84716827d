"""Detector failure reports: schema ``dtm-report/1``, one JSON object per line.

    {"schema": "dtm-report/1",
     "report_id": "r-0001",                  # unique
     "frame_uri": "s3://lake/cam1/000123.jpg",  # image path / s3:// URI / VIDEO#frame=N
     "frame_id": "cam1/000123", "sequence_id": "cam1", "timestamp": 12.3,
     "detector": "yolo", "model_version": "2026.11",
     "error_type": "false_positive" | "false_negative",
     "class": "person",
     "boxes": [[x1, y1, x2, y2], ...],       # pixels of the frame; several = co-occurring objects
     "score": 0.71,                          # detector score; absent (or null) for false negatives
     "tags": ["night", "rain"]}

:func:`parse_lines` turns lines into :class:`Report` records or quarantine entries;
:mod:`dtm_ops.validation` checks the records with Great Expectations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

SCHEMA = "dtm-report/1"
ERROR_TYPES = ("false_positive", "false_negative")
REQUIRED = ("report_id", "frame_uri", "error_type", "class", "boxes")


@dataclass
class Report:
    report_id: str
    frame_uri: str
    error_type: str
    cls: str
    boxes: list
    frame_id: str | None = None
    sequence_id: str | None = None
    timestamp: float | str | None = None
    detector: str | None = None
    model_version: str | None = None
    score: float | None = None
    tags: list = field(default_factory=list)
    origin: str = ""  # file and line it came from

    def to_json(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        d["schema"] = SCHEMA
        return d

    @classmethod
    def from_json(cls, obj: dict, origin: str = "") -> "Report":
        return cls(
            report_id=obj.get("report_id"),
            frame_uri=obj.get("frame_uri"),
            error_type=obj.get("error_type"),
            cls=obj.get("class"),
            boxes=obj.get("boxes"),
            frame_id=obj.get("frame_id"),
            sequence_id=obj.get("sequence_id"),
            timestamp=obj.get("timestamp"),
            detector=obj.get("detector"),
            model_version=obj.get("model_version"),
            score=obj.get("score"),
            tags=obj.get("tags") or [],
            origin=obj.get("origin", origin),
        )


@dataclass
class Quarantined:
    """A record that will not be mined, and why (one reason per failed check)."""

    origin: str
    record: object
    reasons: list[str]

    def to_json(self) -> dict:
        return {"origin": self.origin, "record": self.record, "reasons": self.reasons}


def parse_lines(text: str, source: str) -> tuple[list[Report], list[Quarantined]]:
    """Parse a report file's lines; lines that are not JSON objects are quarantined here."""
    from dtm_ops.jsonlines import iter_objects

    reports, bad = [], []
    for n, obj, problem, line in iter_objects(text):
        origin = f"{source}:{n}"
        if obj is None:
            bad.append(Quarantined(origin, line[:500], [problem]))
            continue
        if obj.get("schema", SCHEMA) != SCHEMA:
            bad.append(Quarantined(origin, obj, [f"field 'schema': unknown schema {obj.get('schema')!r} (expected {SCHEMA})"]))
            continue
        reports.append(Report.from_json(obj, origin))
    return reports, bad
