"""Labeling sinks: where mined frames go to be labeled. Registered by name.

- ``manifest``: Label Studio import-format JSON tasks in a folder or S3 prefix, one object
  per item key (a rerun overwrites, never duplicates); Label Studio's source storage and
  other tools read them from there.
- ``label_studio``: tasks imported into a Label Studio project
  (:mod:`dtm_ops.sinks.label_studio`).
- ``none``: push nothing (dry runs).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


def item_key(query_id: str, frame_id: str) -> str:
    """Deterministic id of a pushed item: the same report and frame always give the same key."""
    return hashlib.sha256(f"{query_id}\x00{frame_id}".encode()).hexdigest()[:24]


def to_label_studio_task(hit: dict, *, run_id: str, model_version: str, width: int, height: int) -> dict:
    """A mined hit in Label Studio's task import format, the best-match box as a prediction
    (``rectanglelabels`` in percent of the frame)."""
    x1, y1, x2, y2 = hit["box"]
    label = hit.get("label") or "object"
    return {
        "data": {
            "image": hit["source"],
            "dtm_key": item_key(hit["query_id"], hit["frame_id"]),
            "query_id": hit["query_id"],
            "frame_id": hit["frame_id"],
            "class": label,
            "score": hit["score"],
            "rank": hit["rank"],
            "run_id": run_id,
        },
        "predictions": [
            {
                "model_version": model_version,
                "score": hit["score"],
                "result": [
                    {
                        "id": item_key(hit["query_id"], hit["frame_id"])[:10],
                        "from_name": "label",
                        "to_name": "image",
                        "type": "rectanglelabels",
                        "original_width": width,
                        "original_height": height,
                        "value": {
                            "x": 100.0 * x1 / width,
                            "y": 100.0 * y1 / height,
                            "width": 100.0 * (x2 - x1) / width,
                            "height": 100.0 * (y2 - y1) / height,
                            "rotation": 0,
                            "rectanglelabels": [label],
                        },
                    }
                ],
            }
        ],
    }


@dataclass
class PushResult:
    pushed: list[str]  # keys sent now
    skipped: list[str]  # keys already there (a rerun)
    links: dict[str, str] = field(default_factory=dict)  # key -> where the item is in the labeling queue


class Sink(Protocol):
    name: str

    def existing_keys(self, keys: Sequence[str]) -> set[str]: ...

    def push(self, tasks: Sequence[dict], on_chunk: "Callable[[list[str]], None] | None" = None) -> PushResult:
        """Send the tasks the sink does not hold yet; ``on_chunk`` hears of each batch that landed."""


class ManifestSink:
    """Tasks as ``<uri>/tasks/<key>.json`` (a folder or ``s3://`` prefix)."""

    name = "manifest"

    def __init__(self, uri: str) -> None:
        from dtm_ops.store.objects import open_objects

        self.uri = uri
        self.objects = open_objects(uri)

    def existing_keys(self, keys: Sequence[str]) -> set[str]:
        return {k for k in keys if self.objects.size(f"tasks/{k}.json") is not None}

    def push(self, tasks: Sequence[dict], on_chunk: Callable[[list[str]], None] | None = None) -> PushResult:
        import json

        keys = [t["data"]["dtm_key"] for t in tasks]
        have = self.existing_keys(keys)
        pushed = []
        for t, k in zip(tasks, keys):
            if k in have:
                continue
            self.objects.put(f"tasks/{k}.json", json.dumps(t, indent=1).encode())
            pushed.append(k)
            if on_chunk:
                on_chunk([k])
        return PushResult(pushed=pushed, skipped=sorted(have), links={k: f"{self.uri}/tasks/{k}.json" for k in keys})


def open_sink(name: str, uri: str | None = None, label_studio=None) -> Sink | None:
    """The sink called ``name`` (``manifest``, ``label_studio``, ``none``).

    ``label_studio``: a :class:`~dtm_ops.sinks.label_studio.LabelStudioConfig` (default:
    from the environment)."""
    if name == "none":
        return None
    if name == "label_studio":
        from dtm_ops.sinks.label_studio import LabelStudioConfig, LabelStudioSink

        return LabelStudioSink(label_studio or LabelStudioConfig.from_env())
    if name == "manifest":
        if not uri:
            raise ValueError("the manifest sink needs a location (DTM_SINK_URI)")
        return ManifestSink(uri)
    raise ValueError(f"unknown labeling sink {name!r}; known: manifest, label_studio, none")
