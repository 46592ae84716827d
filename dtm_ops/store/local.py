"""A feature store in a local directory (the embedded demo, and tests)."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from dtm_ops.errors import FeatureStoreError
from dtm_ops.fingerprint import Fingerprint
from dtm_ops.projection import Projection
from dtm_ops.store.format import (
    DTYPES,
    FrameEntry,
    Manifest,
    ShardEntry,
    check_finite,
    decode_shard,
    encode_shard,
)

MANIFEST = "manifest.json"
PROJECTION = "projection.safetensors"


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: never half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class LocalFeatureStore:
    """Sharded frame features under ``root`` (see :mod:`dtm_ops.store.format`)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- reading
    def exists(self) -> bool:
        return (self.root / MANIFEST).is_file()

    def manifest(self) -> Manifest:
        path = self.root / MANIFEST
        if not path.is_file():
            raise FeatureStoreError(f"{self.root}: no feature store here (missing {MANIFEST}); run 'dtm extract' first")
        return Manifest.from_json(path.read_text(), source=str(path))

    def projection(self) -> Projection | None:
        path = self.root / PROJECTION
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        t = load_file(str(path))
        return Projection(mean=t["mean"], components=t["components"])

    def read_shard(self, entry: ShardEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features Tensor[N, C, H, W], valid Tensor[N, 2])`` of one shard, verified."""
        path = self.root / "shards" / entry.name
        if not path.is_file():
            raise FeatureStoreError(f"{self.root}: shard {entry.name} named by the manifest is missing")
        features, valid = decode_shard(path.read_bytes(), entry, source=str(self.root))
        check_finite(features, [f.frame_id for f in entry.frames], source=f"{self.root}: shard {entry.name}")
        return features, valid

    def iter_shards(
        self, shards: Sequence[ShardEntry] | None = None
    ) -> Iterator[tuple[ShardEntry, torch.Tensor, torch.Tensor]]:
        for entry in self.manifest().shards if shards is None else shards:
            yield (entry, *self.read_shard(entry))

    def frame_features(self, frame_ids: Sequence[str]) -> dict[str, tuple[FrameEntry, torch.Tensor]]:
        """Features ``Tensor[C, H, W]`` of selected frames (reads only the shards that hold them)."""
        wanted = set(frame_ids)
        out: dict[str, tuple[FrameEntry, torch.Tensor]] = {}
        for entry in self.manifest().shards:
            rows = [i for i, f in enumerate(entry.frames) if f.frame_id in wanted]
            if rows:
                features, _ = self.read_shard(entry)
                for i in rows:
                    out[entry.frames[i].frame_id] = (entry.frames[i], features[i])
        return out

    # ----------------------------------------------------------------- writing
    def save_projection(self, projection: Projection) -> None:
        from safetensors.torch import save

        atomic_write(self.root / PROJECTION, save(projection.state_dict()))

    def append(
        self,
        fingerprint: Fingerprint,
        frames: Sequence[FrameEntry],
        features: Sequence[torch.Tensor],
        *,
        dtype: str = "float16",
    ) -> list[ShardEntry]:
        """Add frames (``features[k]``: ``Tensor[C, H, W]``) as new shards, one per grid size.

        Frames already in the store are skipped. Shards are written first, the manifest
        last, each under a temporary name then renamed, so a reader sees the old store or
        the new one, never a manifest naming a missing shard.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        manifest = self.manifest() if self.exists() else Manifest(fingerprint=fingerprint, dtype=dtype)
        fingerprint.check_same(manifest.fingerprint, what=f"features in {self.root}")
        if manifest.dtype != dtype:
            raise FeatureStoreError(f"{self.root}: store holds {manifest.dtype} features, asked to append {dtype}")
        have = manifest.frame_ids()
        groups: dict[tuple[int, int], list[int]] = {}
        for k, (f, t) in enumerate(zip(frames, features, strict=True)):
            if f.frame_id in have:
                continue
            have.add(f.frame_id)
            groups.setdefault(tuple(t.shape[1:]), []).append(k)
        new: list[ShardEntry] = []
        for grid, idxs in groups.items():
            feats = torch.stack([features[k] for k in idxs]).to(DTYPES[dtype])
            check_finite(feats, [frames[k].frame_id for k in idxs], source=str(self.root))
            valid = torch.tensor([frames[k].valid for k in idxs], dtype=torch.int32)
            data = encode_shard(feats, valid)
            digest = hashlib.sha256(data).hexdigest()
            name = f"{digest[:20]}.safetensors"  # content-addressed: a retry rewrites the same name
            atomic_write(self.root / "shards" / name, data)
            new.append(
                ShardEntry(name=name, sha256=digest, bytes=len(data), grid=grid, frames=tuple(frames[k] for k in idxs))
            )
        if new:
            manifest.shards.extend(new)
            atomic_write(self.root / MANIFEST, manifest.to_json().encode())
        return new
