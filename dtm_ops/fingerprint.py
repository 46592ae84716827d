"""Fingerprint of a feature set: what made it, so templates and frames are comparable."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from dtm_ops.errors import FingerprintMismatch


@dataclass(frozen=True)
class Fingerprint:
    backbone: str
    weights: str  # sha256 of the weights file, or "random"
    layer: str
    stride: int
    channels: int  # after projection
    preprocess: dict = field(default_factory=dict)
    projection: str | None = None  # sha256 of the projection's bytes, or None

    @property
    def id(self) -> str:
        """Short stable digest of every field (16 hex digits)."""
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "id": self.id}

    @classmethod
    def from_dict(cls, data: dict) -> "Fingerprint":
        fields = {k: v for k, v in data.items() if k != "id"}
        fp = cls(**fields)
        if "id" in data and data["id"] != fp.id:
            raise FingerprintMismatch(f"fingerprint id {data['id']} does not match its fields (computed {fp.id})")
        return fp

    def check_same(self, other: "Fingerprint", *, what: str = "features") -> None:
        """Raise :class:`FingerprintMismatch` unless ``other`` is the same extractor."""
        if other.id != self.id:
            diff = {
                k: (v, getattr(other, k)) for k, v in asdict(self).items() if v != getattr(other, k)
            }
            raise FingerprintMismatch(
                f"{what} were made by another feature extractor (fingerprint {other.id} != {self.id}); "
                f"differences (query, {what}): {diff}"
            )
