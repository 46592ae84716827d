"""The feature-store format, version 1.

Layout under a store root::

    manifest.json              the manifest (below); replaced atomically, written last
    shards/<name>.safetensors  one shard: frames of one padded grid size
    projection.safetensors     optional PCA projection (its sha256 is in the fingerprint)

A shard is a safetensors file (a JSON header and raw little-endian arrays: reading it
runs no code, unlike pickle / ``torch.load``) with tensors

    features  Tensor[N, C, H, W]  float16 (default) or float32, unit-norm per valid cell
    valid     Tensor[N, 2]        int32, valid (rows, cols) of cells per frame

The manifest lists, per shard, its sha256, byte size, grid and frames (frame id, source
URI, sequence and index, original width/height, valid cells, resize scale), together
with the feature fingerprint, dtype and format version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch

from dtm_ops.errors import FeatureStoreError
from dtm_ops.fingerprint import Fingerprint

FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class FrameEntry:
    frame_id: str
    source: str
    sequence: str
    index: int
    width: int
    height: int
    valid: tuple[int, int]
    scale: float


@dataclass(frozen=True)
class ShardEntry:
    name: str
    sha256: str
    bytes: int
    grid: tuple[int, int]
    frames: tuple[FrameEntry, ...]


@dataclass
class Manifest:
    fingerprint: Fingerprint
    dtype: str = "float16"
    shards: list[ShardEntry] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def frame_count(self) -> int:
        return sum(len(s.frames) for s in self.shards)

    def frame_ids(self) -> set[str]:
        return {f.frame_id for s in self.shards for f in s.frames}

    def to_json(self) -> str:
        return json.dumps(
            {
                "format_version": self.format_version,
                "fingerprint": self.fingerprint.to_dict(),
                "dtype": self.dtype,
                "shards": [asdict(s) for s in self.shards],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, *, source: str) -> "Manifest":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FeatureStoreError(f"{source}: manifest is not valid JSON ({exc})") from None
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise FeatureStoreError(
                f"{source}: unknown feature-store format version {version!r} (this dtm-ops reads {FORMAT_VERSION})"
            )
        if data.get("dtype") not in DTYPES:
            raise FeatureStoreError(f"{source}: field 'dtype': unknown dtype {data.get('dtype')!r}")
        try:
            shards = [
                ShardEntry(
                    name=s["name"],
                    sha256=s["sha256"],
                    bytes=int(s["bytes"]),
                    grid=tuple(s["grid"]),
                    frames=tuple(
                        FrameEntry(**{**f, "valid": tuple(f["valid"])}) for f in s["frames"]
                    ),
                )
                for s in data["shards"]
            ]
            fingerprint = Fingerprint.from_dict(data["fingerprint"])
        except (KeyError, TypeError) as exc:
            raise FeatureStoreError(f"{source}: manifest is missing or has a bad field: {exc}") from None
        return cls(fingerprint=fingerprint, dtype=data["dtype"], shards=shards, format_version=version)


def encode_shard(features: torch.Tensor, valid: torch.Tensor) -> bytes:
    """``features (Tensor[N, C, H, W])``, ``valid (Tensor[N, 2])`` -> safetensors bytes."""
    from safetensors.torch import save

    return save(
        {"features": features.contiguous(), "valid": valid.to(torch.int32).contiguous()},
        metadata={"format": f"dtm-shard/{FORMAT_VERSION}"},
    )


def decode_shard(data: bytes, entry: ShardEntry, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify ``data`` against the manifest entry and return ``(features, valid)``."""
    from safetensors.torch import load

    digest = hashlib.sha256(data).hexdigest()
    if digest != entry.sha256:
        raise FeatureStoreError(
            f"{source}: shard {entry.name}: checksum mismatch (sha256 {digest[:16]}..., manifest says {entry.sha256[:16]}...)"
        )
    try:
        tensors = load(data)
        features, valid = tensors["features"], tensors["valid"]
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt shard
        raise FeatureStoreError(f"{source}: shard {entry.name}: cannot decode ({exc})") from None
    if features.shape[0] != len(entry.frames) or tuple(features.shape[2:]) != tuple(entry.grid):
        raise FeatureStoreError(
            f"{source}: shard {entry.name}: holds {tuple(features.shape)}, manifest says "
            f"{len(entry.frames)} frames of grid {tuple(entry.grid)}"
        )
    return features, valid


def check_finite(features: torch.Tensor, frame_ids: list[str], *, source: str) -> None:
    """Raise naming the first frame whose features hold NaN or inf."""
    bad = ~torch.isfinite(features.reshape(features.shape[0], -1)).all(dim=1)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise FeatureStoreError(f"{source}: frame {frame_ids[first]!r}: field 'features' holds NaN or inf")
