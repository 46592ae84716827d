"""Errors that name what was wrong: the file or URI, the record and the field."""

from __future__ import annotations


class DtmError(Exception):
    """Base class of every error dtm-ops raises on purpose."""


class InputError(DtmError, ValueError):
    """Bad input: the message names the source, the record and the field.

    >>> str(InputError("x1 >= x2", source="q.jsonl", record=3, field="boxes[0]"))
    "q.jsonl: record 3: field 'boxes[0]': x1 >= x2"
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        record: object | None = None,
        field: str | None = None,
    ) -> None:
        self.source = source
        self.record = record
        self.field = field
        self.reason = message
        parts = []
        if source is not None:
            parts.append(str(source))
        if record is not None:
            parts.append(f"record {record}")
        if field is not None:
            parts.append(f"field {field!r}")
        parts.append(message)
        super().__init__(": ".join(parts))


class UnreadableFrame(InputError):
    """A frame whose content cannot be had: a damaged image or video, or a file deleted since
    it was listed. Indexing leaves such a frame out, names it and goes on
    (:func:`dtm_ops.indexing.index_frames`); a storage error that a retry may cure is not
    this, and fails the task."""


class FingerprintMismatch(DtmError):
    """Templates and frame features come from different feature extractors."""


class FeatureStoreError(DtmError):
    """A feature store is missing, corrupt, or of an unknown format."""


class WeightsError(DtmError):
    """Backbone weights are missing or do not fit the architecture."""
