"""The feature-store format, version 1.

Layout under a store root (a folder, or ``s3://bucket/prefix``)::

    shards/<sha256[:20]>.safetensors    one shard: frames of one padded grid size
    manifests/v0000000001.json.gz       manifest version 1 (immutable), 2, 3, ...
    latest.json                         {"version": N}: the newest committed version (a hint)
    projection.safetensors              optional PCA projection (its sha256 is in the fingerprint)
    staging/                            a run's working objects (the index DAG's batch lists)

A commit writes its shards, then creates the next manifest version *exclusively* (a
second writer of the same version fails and retries on top of the winner), then the
pointer. Readers take the pointer and probe forward for newer versions, so a reader
never sees a manifest naming a missing shard, and a lagging pointer costs one request.
A shard no manifest names (its writer died before the commit, or lost the commit and
rewrote it smaller) is garbage: ``FeatureStore.gc`` deletes it after a grace period.

A shard is a safetensors file (a JSON header and raw little-endian arrays: reading it
runs no code, unlike pickle / ``torch.load``) with tensors

    features     Tensor[N, C, H, W]  float16 (default), float32, or int8, unit-norm per valid cell
    scales       Tensor[N, 1, H, W]  float16, int8 only: features = int8 * scales / 127
    valid        Tensor[N, 2]        int32, valid (rows, cols) of cells per frame
    frame_crc64  Tensor[N, 2]        int32: each frame's CRC-64/NVME (its little-endian bytes)
                                     over its rows of features, scales and valid, in that order

``frame_crc64`` lets a reader fetch a few frames of a shard as byte ranges and still check
them (:func:`shard_layout`, :func:`decode_frame`); shards written before it are read whole.

Each manifest is a full snapshot: per shard its sha256, CRC-64/NVME, byte size, grid and
frames (frame id, source URI, sequence and index, original width/height, valid cells,
resize scale), with the feature fingerprint, dtype, format version and its own version
number. It is gzip-compressed JSON. Readers ignore fields they do not know, so the CRC
(added after version 1 shipped) did not need a new format version.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from dtm_ops.errors import FeatureStoreError
from dtm_ops.fingerprint import Fingerprint

FORMAT_VERSION = 1
DTYPES = {"float16": torch.float16, "float32": torch.float32, "int8": torch.int8}


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
    """One shard in a manifest. ``sha256`` is its identity (the name is its prefix);
    ``crc64nvme`` (16 hex digits) is what readers check on every read (:func:`decode_shard`).
    Manifests written before it existed have ``None`` there, and their shards are checked
    by sha256."""

    name: str
    sha256: str
    bytes: int
    grid: tuple[int, int]
    frames: tuple[FrameEntry, ...]
    crc64nvme: str | None = None


def crc64nvme(data) -> str:
    """CRC-64/NVME of a bytes-like object, as 16 hex digits: the checksum S3 itself keeps by
    default. It runs at about 20 GB/s on one core (carry-less multiply), where sha256 runs at
    about 1: on a scan, checking every shard read with sha256 cost as much CPU as the read
    itself. A CRC catches corruption in transit or at rest (what the check is for); it
    is no defence against someone who can write the bucket, and neither is a sha256 of a
    manifest kept in the same bucket."""
    from awscrt.checksums import crc64nvme as crc

    return f"{crc(data):016x}"


@dataclass
class Manifest:
    fingerprint: Fingerprint
    dtype: str = "float16"
    shards: list[ShardEntry] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    version: int = 0

    @property
    def frame_count(self) -> int:
        return sum(len(s.frames) for s in self.shards)

    def frame_ids(self) -> set[str]:
        return {f.frame_id for s in self.shards for f in s.frames}

    def to_bytes(self) -> bytes:
        doc = {
            "format_version": self.format_version,
            "version": self.version,
            "fingerprint": self.fingerprint.to_dict(),
            "dtype": self.dtype,
            "shards": [asdict(s) for s in self.shards],
        }
        return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), mtime=0)

    @classmethod
    def from_bytes(cls, blob: bytes, *, source: str) -> "Manifest":
        try:
            data = json.loads(gzip.decompress(blob))
        except (OSError, EOFError, ValueError) as exc:
            raise FeatureStoreError(f"{source}: manifest is not gzip-compressed JSON ({exc})") from None
        if not isinstance(data, dict):
            raise FeatureStoreError(f"{source}: manifest is not a JSON object")
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
                    crc64nvme=s.get("crc64nvme"),
                )
                for s in data["shards"]
            ]
            fingerprint = Fingerprint.from_dict(data["fingerprint"])
        except (KeyError, TypeError) as exc:
            raise FeatureStoreError(f"{source}: manifest is missing or has a bad field: {exc}") from None
        return cls(
            fingerprint=fingerprint,
            dtype=data["dtype"],
            shards=shards,
            format_version=version,
            version=int(data.get("version", 0)),
        )


def encode_shard(features: torch.Tensor, valid: torch.Tensor, dtype: str = "float16") -> bytes:
    """``features (Tensor[N, C, H, W])``, ``valid (Tensor[N, 2])`` -> safetensors bytes.

    ``int8`` quantises per position: ``scale = max |x| over channels``, ``q = round(127 x / scale)``.

    The same tensors give the same bytes, so a shard's name (its hash) is its content's:
    the metadata holds one key, because safetensors writes several in hash-map order,
    which changes from call to call (the dtype is the tensors' own, in the header).
    """
    from safetensors.torch import save

    tensors = {"valid": valid.to(torch.int32).contiguous()}
    if dtype == "int8":
        x = features.float()
        scales = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)
        tensors["features"] = torch.round(x / scales * 127).to(torch.int8).contiguous()
        tensors["scales"] = scales.to(torch.float16).contiguous()
    else:
        tensors["features"] = features.to(DTYPES[dtype]).contiguous()
    tensors["frame_crc64"] = frame_checksums(tensors)
    return save(tensors, metadata={"format": f"dtm-shard/{FORMAT_VERSION}"})


#: A frame's rows that its checksum covers, in order (``scales`` in int8 shards only).
FRAME_PARTS = ("features", "scales", "valid")


def frame_checksums(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """``Tensor[N, 2]`` int32: each frame's CRC-64/NVME over its rows of :data:`FRAME_PARTS`
    (contiguous tensors of ``N`` rows), as little-endian bytes. Stored as int32: it sorts
    before ``valid`` in the file, so both tables sit right after the header (safetensors
    orders tensors by alignment, then name) and one small read gets a reader the header and
    both; and readers older than the table know the dtype, so they read such shards (and
    ignore the table)."""
    from awscrt.checksums import crc64nvme as crc

    parts = [tensors[k].reshape(tensors[k].shape[0], -1).view(torch.uint8).numpy() for k in FRAME_PARTS if k in tensors]
    sums = []
    for n in range(parts[0].shape[0]):
        value = 0
        for part in parts:
            value = crc(part[n], value)
        sums.append(value)
    return torch.from_numpy(np.array(sums, dtype="<u8").view("<i4").reshape(-1, 2))


@dataclass(frozen=True)
class ShardLayout:
    """Where each frame's rows lie in a shard file, from its header (:func:`shard_layout`).

    ``parts``: for :data:`FRAME_PARTS` present and ``frame_crc64``, ``name -> (begin, row
    bytes, dtype, row shape)``, byte offsets into the file."""

    frames: int
    parts: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]]

    def row(self, name: str, r: int) -> tuple[int, int]:
        """Byte range of frame ``r``'s row of tensor ``name``."""
        begin, size, _, _ = self.parts[name]
        return begin + r * size, begin + (r + 1) * size

    def tables(self) -> tuple[int, int]:
        """Byte range holding the ``frame_crc64`` and ``valid`` tables (next to each other:
        right after the header, unless float32 features come first)."""
        spans = [(b, b + self.frames * size) for b, size, _, _ in (self.parts["frame_crc64"], self.parts["valid"])]
        return min(b for b, _ in spans), max(e for _, e in spans)


def header_size(head: bytes | memoryview, total: int) -> int:
    """Bytes a shard's header takes, its 8-byte length included (``head``: the file's first
    8 bytes or more; ``total``: its size)."""
    (size,) = struct.unpack("<Q", bytes(head[:8]))
    if 8 + size > total:
        raise ValueError(f"a header of {size} bytes does not fit a file of {total}")
    return 8 + size


def shard_layout(head: bytes | memoryview, total: int) -> ShardLayout | None:
    """The layout of a shard of ``total`` bytes from ``head``, its first :func:`header_size`
    bytes or more; ``None`` for a shard without ``frame_crc64`` (written before it: read whole)."""
    header = _header(head, total)
    if "frame_crc64" not in header:
        return None
    n = header["frame_crc64"]["shape"][0]
    start = header_size(head, total)
    parts = {}
    for name in (*FRAME_PARTS, "frame_crc64"):
        if name in header:
            begin, end, dtype, shape = _span(name, header[name], start, total)
            if shape[0] != n:
                raise ValueError(f"tensor {name!r} of shape {shape} does not have one row per frame ({n})")
            parts[name] = (begin, (end - begin) // n if n else 0, dtype, shape[1:])
    return ShardLayout(frames=n, parts=parts)


def decode_frame(
    layout: ShardLayout, r: int, fetch: Callable[[int, int], torch.Tensor], *, source: str, shard: str, frame_id: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame ``r`` of a shard from its byte ranges (``fetch(begin, end)``: ``Tensor[bytes]
    uint8`` of the file), checked against its ``frame_crc64``: ``(features Tensor[C, H, W],
    valid Tensor[2])`` as :func:`decode_shard` gives them."""
    from awscrt.checksums import crc64nvme as crc

    if not 0 <= r < layout.frames:
        raise ValueError(f"frame {r} of a shard of {layout.frames}")
    want = int(np.frombuffer(fetch(*layout.row("frame_crc64", r)).numpy().tobytes(), dtype="<u8")[0])
    rows, value = {}, 0
    for name in FRAME_PARTS:
        if name in layout.parts:
            data = fetch(*layout.row(name, r))
            value = crc(data.numpy(), value)
            _, _, dtype, shape = layout.parts[name]
            rows[name] = data.view(dtype).reshape(shape)
    if value != want:
        raise FeatureStoreError(
            f"{source}: shard {shard}: frame {frame_id!r}: checksum mismatch (crc64nvme {value:016x}, "
            f"the shard says {want:016x})"
        )
    features = rows["features"]
    if features.dtype == torch.int8:
        features = _dequantise(features, rows["scales"])
    return features, rows["valid"]


def _dequantise(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """int8 features and their float16 scales -> float16 features."""
    return (q.to(torch.float32) * scales.to(torch.float32) / 127).to(torch.float16)


def decode_shard(data: torch.Tensor, entry: ShardEntry, *, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a shard's bytes against the manifest entry and return ``(features, valid)``.

    Args:
        data (Tensor[bytes] uint8): the shard file.

    Features come back as float16 (int8 shards are dequantised) or float32. float16 and
    float32 features are views of ``data``, not copies (a scan reads gigabytes; pinned
    bytes give pinned features): treat them as read-only.
    """
    raw = memoryview(data.numpy())
    if len(raw) != entry.bytes:
        raise FeatureStoreError(f"{source}: shard {entry.name}: {len(raw)} bytes, manifest says {entry.bytes}")
    kind, want = ("crc64nvme", entry.crc64nvme) if entry.crc64nvme else ("sha256", entry.sha256)
    got = crc64nvme(raw) if entry.crc64nvme else hashlib.sha256(raw).hexdigest()
    if got != want:
        raise FeatureStoreError(
            f"{source}: shard {entry.name}: checksum mismatch ({kind} {got[:16]}, manifest says {want[:16]})"
        )
    try:
        tensors = _safetensors_views(data, raw)
        features, valid = tensors["features"], tensors["valid"]
        if features.dtype == torch.int8:
            features = _dequantise(features, tensors["scales"])
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a corrupt shard
        raise FeatureStoreError(f"{source}: shard {entry.name}: cannot decode ({exc})") from None
    if features.shape[0] != len(entry.frames) or tuple(features.shape[2:]) != tuple(entry.grid):
        raise FeatureStoreError(
            f"{source}: shard {entry.name}: holds {tuple(features.shape)}, manifest says "
            f"{len(entry.frames)} frames of grid {tuple(entry.grid)}"
        )
    return features, valid


_ST_DTYPES = {"F16": torch.float16, "F32": torch.float32, "I8": torch.int8, "I32": torch.int32}


def _safetensors_views(data: torch.Tensor, raw: memoryview) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file as views of its bytes (``safetensors.torch.load``
    copies them), sharing ``data``'s storage (so page-locked bytes stay page-locked for the
    allocator that tracks them). The layout: an 8-byte little-endian header length, a JSON
    header of ``{name: {dtype, shape, data_offsets}}``, then the data (each tensor aligned
    to its element size by the writers; one that is not is copied).

    Args:
        data (Tensor[bytes] uint8): the file; ``raw`` is its memoryview.
    """
    header = _header(raw, data.numel())
    start = header_size(raw, data.numel())
    out = {}
    for name, meta in header.items():
        begin, end, dtype, shape = _span(name, meta, start, data.numel())
        part = data[begin:end]
        if begin % dtype.itemsize:
            part = part.clone()
        out[name] = part.view(dtype).reshape(shape)
    return out


def _header(head: bytes | memoryview, total: int) -> dict:
    """A shard's safetensors header (``head``: its first :func:`header_size` bytes or more),
    without the metadata."""
    header = json.loads(bytes(head[8 : header_size(head, total)]))
    header.pop("__metadata__", None)
    return header


def _span(name: str, meta: dict, start: int, total: int) -> tuple[int, int, torch.dtype, tuple[int, ...]]:
    """``(begin, end, dtype, shape)`` of a tensor's data in a file of ``total`` bytes whose data
    begins at ``start``."""
    dtype = _ST_DTYPES[meta["dtype"]]
    begin, end = start + meta["data_offsets"][0], start + meta["data_offsets"][1]
    shape = tuple(meta["shape"])
    if not start <= begin <= end <= total or end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name!r}: data offsets {meta['data_offsets']} do not fit the file")
    return begin, end, dtype, shape


def check_finite(features: torch.Tensor, frame_ids: list[str], *, source: str) -> None:
    """Raise naming the first frame whose features hold NaN or inf."""
    bad = ~torch.isfinite(features.reshape(features.shape[0], -1)).all(dim=1)
    if bad.any():
        first = int(bad.nonzero()[0])
        raise FeatureStoreError(f"{source}: frame {frame_ids[first]!r}: field 'features' holds NaN or inf")
