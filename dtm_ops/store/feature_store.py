"""The feature store: versioned manifests and checksummed shards over an object store.

See :mod:`dtm_ops.store.format` for the layout and the commit protocol.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from dtm_ops.errors import FeatureStoreError
from dtm_ops.fingerprint import Fingerprint
from dtm_ops.projection import Projection
from dtm_ops.settings import GC_GRACE_HOURS, env_number
from dtm_ops.store.format import (
    DTYPES,
    FrameEntry,
    Manifest,
    ShardEntry,
    check_finite,
    crc64nvme,
    ShardLayout,
    decode_frame,
    decode_shard,
    encode_shard,
    header_size,
    shard_layout,
)
from dtm_ops.store.objects import AlreadyExists, ObjectNotFound, ObjectStore, S3Config, open_objects

log = logging.getLogger(__name__)

POINTER = "latest.json"
PROJECTION = "projection.safetensors"
SHARDS = "shards/"
#: Objects a run needs only while it runs (the index DAG's batch lists): :meth:`FeatureStore.gc`
#: deletes them once they are older than its grace period.
STAGING = "staging/"
#: :meth:`FeatureStore.gc` deletes nothing younger than this (:data:`dtm_ops.settings.GC_GRACE_HOURS`).
GC_GRACE_S = GC_GRACE_HOURS * 3600
#: Stores with ``ranged_reads`` (S3) fetch a shard as parallel ranged GETs of about
#: ``1 / workers`` of it, at least MIN_PART_BYTES and at most PART_BYTES (parallel parts pay
#: off on high-latency servers; on a nearby one they cost nothing more). Parts so sized keep
#: the GETs in flight on the earliest shard, so shards arrive one after the other and the
#: scan can match the first while the rest arrive. A local folder reads each shard whole.
PART_BYTES = 64 << 20
MIN_PART_BYTES = 8 << 20
#: :meth:`FeatureStore.frame_features` reads a shard's wanted frames as byte ranges where
#: they are at most 1 in this many of its frames, else the whole shard.
FRAME_READ_RATIO = 4
#: Bytes first read of a shard whose frames are read as ranges: its header, and its checksum
#: and valid tables (16 bytes a frame) where they follow it.
HEAD_BYTES = 16 << 10


def part_bytes(size: int, workers: int) -> int:
    """Size of the ranged parts of a shard of ``size`` bytes read by ``workers`` threads."""
    return min(PART_BYTES, max(MIN_PART_BYTES, -(-size // max(1, workers))))


def manifest_key(version: int) -> str:
    return f"manifests/v{version:010d}.json.gz"


def _gc_verb(dry_run: bool) -> str:
    return "would delete" if dry_run else "deleted"


@dataclass(frozen=True)
class GcReport:
    """What :meth:`FeatureStore.gc` found (keys relative to the store's root)."""

    uri: str  #: the store
    version: int  #: the manifest version whose shards were kept (0: none committed)
    named: int  #: shards that manifest names
    missing: tuple[str, ...]  #: named but absent: scans of the store fail on them
    young: tuple[str, ...]  #: garbage younger than the grace period, kept
    deleted: tuple[str, ...]  #: garbage deleted (with ``dry_run``: that would be)
    deleted_bytes: int
    failed: tuple[str, ...]  #: garbage the store refused to delete (each logged with its reason)
    dry_run: bool

    @property
    def verb(self) -> str:
        """What was done to :attr:`deleted`."""
        return _gc_verb(self.dry_run)

    def summary(self) -> dict:
        return {
            "version": self.version, "named_shards": self.named, "missing_shards": list(self.missing),
            "kept_young": len(self.young), "deleted": len(self.deleted), "deleted_bytes": self.deleted_bytes,
            "not_deleted": list(self.failed), "dry_run": self.dry_run,
        }

    def check(self) -> None:
        """Raise :class:`FeatureStoreError` naming the missing shards and the garbage that
        could not be deleted, if any (the rest was collected all the same)."""
        problems = []
        if self.missing:
            problems.append(f"{len(self.missing)} shard(s) named by manifest version {self.version} are missing: "
                            + ", ".join(self.missing))
        if self.failed:
            problems.append(f"{len(self.failed)} unused object(s) could not be deleted (see the log): "
                            + ", ".join(self.failed))
        if problems:
            raise FeatureStoreError(f"{self.uri}: " + "; ".join(problems))


class FeatureStore:
    """Sharded frame features under a folder or ``s3://bucket/prefix``.

    Args:
        objects: where the bytes live (:func:`dtm_ops.store.objects.open_objects`).
        workers: threads for parallel (ranged) GETs, and for checksums and decoding, when
            streaming shards.
        prefetch_bytes: memory budget of shard bytes fetched ahead of the consumer (at
            least one shard is always in flight); default ``DTM_PREFETCH_MB`` MiB from the
            environment, else 512. The GETs of all shards in flight overlap, so a GPU
            worker reading a high-latency store wants several shards' worth.
    """

    def __init__(self, objects: ObjectStore, *, workers: int = 8, prefetch_bytes: int | None = None) -> None:
        self.objects = objects
        self.workers = workers
        if prefetch_bytes is None:
            prefetch_bytes = env_number("DTM_PREFETCH_MB", 512) << 20
        self.prefetch_bytes = prefetch_bytes
        self._manifests: dict[int, Manifest] = {}

    @classmethod
    def open(cls, uri: str | os.PathLike, *, s3_config: S3Config | None = None, **kwargs) -> "FeatureStore":
        return cls(open_objects(uri, s3_config=s3_config), **kwargs)

    @property
    def uri(self) -> str:
        return self.objects.uri

    # ------------------------------------------------------------------ versions
    def latest_version(self) -> int:
        """Newest committed manifest version (0: empty store)."""
        version = 0
        try:
            version = int(json.loads(self.objects.get(POINTER))["version"])
        except ObjectNotFound:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("%s: ignoring unreadable %s (%s)", self.uri, POINTER, exc)
        while self.objects.size(manifest_key(version + 1)) is not None:
            version += 1
        return version

    def exists(self) -> bool:
        return self.latest_version() > 0

    def manifest(self, version: int | None = None) -> Manifest:
        """The manifest of ``version`` (default: the newest)."""
        if version is None:
            version = self.latest_version()
        if version == 0:
            raise FeatureStoreError(f"{self.uri}: no feature store here (no manifest); run 'dtm extract' first")
        if version not in self._manifests:
            key = manifest_key(version)
            try:
                blob = self.objects.get(key)
            except ObjectNotFound:
                raise FeatureStoreError(f"{self.uri}: manifest version {version} is missing ({key})") from None
            m = Manifest.from_bytes(blob, source=f"{self.uri}/{key}")
            if m.version != version:
                raise FeatureStoreError(f"{self.uri}/{key}: says it is version {m.version}")
            self._manifests[version] = m
        return self._manifests[version]

    # ------------------------------------------------------------------ garbage
    def gc(self, *, grace_s: float = GC_GRACE_S, dry_run: bool = False, now: float | None = None) -> GcReport:
        """Delete what no reader will ever use, once it is older than ``grace_s`` seconds:
        shards the newest manifest does not name, ``staging/`` objects, and writes left half
        done (a local store's temporary files of a killed writer).

        Unnamed shards are left by index tasks that died between their shards and their
        commit, and by commits that lost frames to another writer and wrote a smaller shard.
        Manifests only grow (:meth:`append` is their one writer, and each version holds every
        shard of the one before), so the newest names every shard an older version names:
        time travel to an old version keeps working. Shards are listed before the manifest
        is read, so a commit made meanwhile keeps its shards; a commit still to come is what
        the grace period protects. Deletes go in batches (:meth:`ObjectStore.delete_many`:
        1000 keys a request on S3), each logged as soon as it is done, so a gc killed midway
        leaves the record of what it deleted; an object the store refuses to delete is logged
        with the reason and listed in :attr:`GcReport.failed`, and the rest are deleted.
        ``now`` (seconds since the epoch) is for tests.
        """
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        listed = list(self.objects.list_info(SHARDS))
        version = self.latest_version()
        if not version and not listed:
            raise FeatureStoreError(f"{self.uri}: no feature store here (no manifest, no shards)")
        named = {SHARDS + e.name for e in self.manifest(version).shards} if version else set()
        found = {o.key for o in listed}
        garbage = [o for o in listed if o.key not in named] + list(self.objects.list_info(STAGING))
        garbage += self.objects.list_partial()  # writes a killed process left half done (a folder's temp files)
        cutoff = (time.time() if now is None else now) - grace_s
        old = [o for o in garbage if o.modified <= cutoff]
        sizes = {o.key: o.bytes for o in old}

        def told(keys: list[str], refused: dict[str, str]) -> None:  # after each request: logged as it goes
            for key in keys:
                if key in refused:
                    log.error("%s: could not delete %s (%s)", self.uri, key, refused[key])
                else:
                    log.info("%s: %s %s (%d bytes, unused)", self.uri, _gc_verb(dry_run), key, sizes[key])

        if dry_run:
            failed: dict[str, str] = {}
            told(list(sizes), failed)
        else:
            failed = self.objects.delete_many(list(sizes), on_done=told)
        done = [o for o in old if o.key not in failed]
        return GcReport(
            uri=self.uri, version=version, named=len(named), missing=tuple(sorted(named - found)),
            young=tuple(o.key for o in garbage if o.modified > cutoff), deleted=tuple(o.key for o in done),
            deleted_bytes=sum(o.bytes for o in done), dry_run=dry_run, failed=tuple(sorted(failed)),
        )

    # ------------------------------------------------------------------ projection
    def projection(self) -> Projection | None:
        from safetensors.torch import load

        try:
            t = load(self.objects.get(PROJECTION))
        except ObjectNotFound:
            return None
        return Projection(mean=t["mean"], components=t["components"])

    def save_projection(self, projection: Projection) -> None:
        from safetensors.torch import save

        self.objects.put(PROJECTION, save(projection.state_dict()))

    # ------------------------------------------------------------------ reading
    def read_shard(self, entry: ShardEntry) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features Tensor[N, C, H, W], valid Tensor[N, 2])`` of one shard, verified."""
        return self._decode(entry, self._start_fetch(entry)())

    def _start_fetch(
        self, entry: ShardEntry, pool: ThreadPoolExecutor | None = None, *, pin_memory: bool = False
    ) -> Callable[[], torch.Tensor]:
        """Start reading a shard; the returned call waits for its bytes, ``Tensor[bytes] uint8``.

        The bytes are read in place: parallel ranged parts (stores with ``ranged_reads``,
        :func:`part_bytes`) land at their offsets, so nothing is joined or copied, and with
        ``pin_memory`` the buffer is page-locked to begin with. With a ``pool``, a ranged
        store's GETs join its queue now, so shards started in order are fetched in order;
        otherwise the read runs in the returned call.

        A pageable buffer is made on the calling thread: glibc gives a worker thread's
        allocations larger than its arena's heaps (64 MiB) fresh mappings whatever its
        thresholds, while the main heap can hand a freed shard's pages to the next
        (:mod:`dtm_ops.allocator`).
        """
        key = SHARDS + entry.name
        read = self.objects.read_into
        alloc: Future | None = None
        if pool is not None and pin_memory:  # page-locking a large buffer takes a while: on a worker, first
            alloc = pool.submit(torch.empty, entry.bytes, dtype=torch.uint8, pin_memory=True)
        elif pool is not None:
            alloc = Future()
            alloc.set_result(torch.empty(entry.bytes, dtype=torch.uint8))
        parts: list[Future] = []
        if alloc is not None and self.objects.ranged_reads:
            part = part_bytes(entry.bytes, self.workers)

            def read_part(o: int) -> None:
                read(key, memoryview(alloc.result().numpy())[o : o + part], o)

            parts = [pool.submit(read_part, o) for o in range(0, entry.bytes, part)]

        def wait() -> torch.Tensor:
            try:
                if alloc is None:
                    buf = torch.empty(entry.bytes, dtype=torch.uint8, pin_memory=pin_memory)
                    read(key, memoryview(buf.numpy()))
                    return buf
                if not self.objects.ranged_reads:  # one read, here (a decode worker)
                    read(key, memoryview(alloc.result().numpy()))
                for done in parts:
                    done.result()
                return alloc.result()
            except ObjectNotFound:
                raise FeatureStoreError(f"{self.uri}: shard {entry.name} named by the manifest is missing") from None

        return wait

    def _decode(self, entry: ShardEntry, data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # No NaN scan here: append() refuses non-finite features, and the checksum proves the
        # bytes are those written.
        return decode_shard(data, entry, source=self.uri)

    def iter_shards(
        self, shards: Sequence[ShardEntry] | None = None, *, pin_memory: bool = False
    ) -> Iterator[tuple[ShardEntry, torch.Tensor, torch.Tensor]]:
        """Stream shards in order, fetching ahead within the memory budget.

        GETs (ranged, in parallel, for large shards), checksum and decoding run on worker
        threads while the caller works on earlier shards. A failed shard raises when the
        caller reaches it; nothing after it is yielded. ``pin_memory``: the decode threads
        also copy features into page-locked memory, so that host-to-GPU copies can run
        asynchronously (:mod:`dtm_ops.transfer`).
        """
        shards = list(self.manifest().shards if shards is None else shards)
        if not shards:
            return
        io_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dtm-get")
        cpu_pool = ThreadPoolExecutor(self.workers, thread_name_prefix="dtm-decode")
        pending: deque[tuple[ShardEntry, Future]] = deque()
        in_flight = 0  # bytes of the shards in `pending`
        nxt = 0

        def load(entry: ShardEntry, fetched: Callable[[], torch.Tensor]):
            features, valid = self._decode(entry, fetched())
            if pin_memory and not features.is_pinned():  # int8 shards: dequantised into new memory
                features = features.pin_memory()
            return features, valid

        def start_more() -> None:
            """Start shards within the budget, and always one when none is in flight."""
            nonlocal in_flight, nxt
            while nxt < len(shards) and (not pending or in_flight + shards[nxt].bytes <= self.prefetch_bytes):
                entry = shards[nxt]
                in_flight += entry.bytes
                fetched = self._start_fetch(entry, io_pool, pin_memory=pin_memory)  # GETs queued in shard order
                pending.append((entry, cpu_pool.submit(load, entry, fetched)))
                nxt += 1

        try:
            start_more()
            while pending:
                entry, fut = pending.popleft()
                features, valid = fut.result()
                in_flight -= entry.bytes
                start_more()  # before the caller works on this shard, so the next ones arrive meanwhile
                yield entry, features, valid
        finally:
            for _, fut in pending:
                fut.cancel()
            io_pool.shutdown(wait=False, cancel_futures=True)  # loads waiting on cancelled GETs end
            cpu_pool.shutdown(wait=True, cancel_futures=True)
            io_pool.shutdown(wait=True)

    def frame_features(self, frame_ids: Sequence[str]) -> dict[str, tuple[FrameEntry, torch.Tensor]]:
        """Features ``Tensor[C, H, W]`` of selected frames, each checked.

        A shard of which at most ``1 / FRAME_READ_RATIO`` of the frames are wanted has just
        those frames read, as byte ranges checked against each frame's own CRC: a first
        read of ``HEAD_BYTES`` (the header and the checksum and valid tables), then one per
        frame (two for int8). The heat maps of a run's hits want one frame of most shards
        they touch. Other shards, and those written before per-frame checksums, are read
        whole."""
        wanted = set(frame_ids)
        out: dict[str, tuple[FrameEntry, torch.Tensor]] = {}
        whole, ranged = [], []
        for s in self.manifest().shards:
            rows = [i for i, f in enumerate(s.frames) if f.frame_id in wanted]
            if rows:
                (ranged if len(rows) * FRAME_READ_RATIO <= len(s.frames) else whole).append((s, rows))
        with ThreadPoolExecutor(self.workers, thread_name_prefix="dtm-frames") as pool:
            heads = list(pool.map(lambda job: self._layout(job[0]), ranged))
            jobs = []
            for (entry, rows), head in zip(ranged, heads):
                if head is None:  # no per-frame checksums
                    whole.append((entry, rows))
                else:
                    jobs += [(entry, head, i) for i in rows]
            for (entry, _, i), features in zip(jobs, pool.map(lambda job: self._read_frame(*job), jobs)):
                out[entry.frames[i].frame_id] = (entry.frames[i], features)
        for (entry, rows), (_, features, _) in zip(whole, self.iter_shards([entry for entry, _ in whole])):
            for i in rows:  # iter_shards yields in the order asked
                out[entry.frames[i].frame_id] = (entry.frames[i], features[i])
        return out

    def _read_range(self, entry: ShardEntry, begin: int, end: int) -> torch.Tensor:
        """Bytes ``[begin, end)`` of a shard, ``Tensor[bytes] uint8``."""
        buf = torch.empty(end - begin, dtype=torch.uint8)
        try:
            if end > begin:
                self.objects.read_into(SHARDS + entry.name, memoryview(buf.numpy()), begin)
        except ObjectNotFound:
            raise FeatureStoreError(f"{self.uri}: shard {entry.name} named by the manifest is missing") from None
        return buf

    def _layout(self, entry: ShardEntry) -> tuple[ShardLayout, int, torch.Tensor] | None:
        """A shard's layout and the bytes read to learn it: ``(layout, offset, bytes)`` holding
        at least its checksum and valid tables; ``None`` for a shard without per-frame
        checksums."""
        head = self._read_range(entry, 0, min(entry.bytes, HEAD_BYTES))
        try:
            size = header_size(head.numpy(), entry.bytes)
            if size > len(head):
                head = self._read_range(entry, 0, size)
            layout = shard_layout(head.numpy(), entry.bytes)
        except (ValueError, KeyError, TypeError) as exc:
            raise FeatureStoreError(f"{self.uri}: shard {entry.name}: cannot decode ({exc})") from None
        if layout is None:
            return None
        begin, end = layout.tables()
        if end <= len(head):
            return layout, 0, head
        return layout, begin, self._read_range(entry, begin, end)  # float32 features come first

    def _read_frame(self, entry: ShardEntry, head: tuple[ShardLayout, int, torch.Tensor], row: int) -> torch.Tensor:
        """Features ``Tensor[C, H, W]`` of one frame of a shard, read as byte ranges (those
        in the bytes of :meth:`_layout` from them) and checked."""
        layout, offset, held = head

        def fetch(begin: int, end: int) -> torch.Tensor:
            if offset <= begin and end <= offset + len(held):
                return held[begin - offset : end - offset]
            return self._read_range(entry, begin, end)

        features, _ = decode_frame(layout, row, fetch, source=self.uri, shard=entry.name,
                                   frame_id=entry.frames[row].frame_id)
        return features

    # ------------------------------------------------------------------ writing
    def append(
        self,
        fingerprint: Fingerprint,
        frames: Sequence[FrameEntry],
        features: Sequence[torch.Tensor],
        *,
        dtype: str = "float16",
        max_conflicts: int = 10,
    ) -> list[ShardEntry]:
        """Add frames (``features[k]``: ``Tensor[C, H, W]``) as new shards, one per grid size.

        Frames already in the store are skipped. Shards are written first, then the next
        manifest version (exclusively), then the pointer. When another writer committed in
        between, the frames it added are dropped from ours, the shards rewritten, and the
        commit retried on top of it (at most ``max_conflicts`` times).
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        for k, f in enumerate(frames):
            check_finite(features[k][None], [f.frame_id], source=self.uri)
        written: dict[tuple[int, ...], ShardEntry] = {}  # shards put by earlier attempts, by their frames
        for _attempt in range(max_conflicts + 1):
            version = self.latest_version()
            if version:
                base = self.manifest(version)
                fingerprint.check_same(base.fingerprint, what=f"features in {self.uri}")
                if base.dtype != dtype:
                    raise FeatureStoreError(f"{self.uri}: store holds {base.dtype} features, asked to append {dtype}")
            else:
                base = Manifest(fingerprint=fingerprint, dtype=dtype)
            new = self._write_shards(base.frame_ids(), frames, features, dtype, written)
            if not new:
                return []
            manifest = Manifest(
                fingerprint=base.fingerprint, dtype=dtype, shards=[*base.shards, *new], version=version + 1
            )
            try:
                self.objects.put(manifest_key(version + 1), manifest.to_bytes(), exclusive=True)
            except AlreadyExists:
                log.info("%s: version %d was committed by another writer; retrying on top of it", self.uri, version + 1)
                continue
            self._manifests[version + 1] = manifest
            self.objects.put(POINTER, json.dumps({"version": version + 1}).encode())
            return new
        raise FeatureStoreError(
            f"{self.uri}: gave up after {max_conflicts} commit conflicts with other writers; nothing was committed"
        )

    def _write_shards(
        self, have: set[str], frames, features, dtype: str, written: dict[tuple[int, ...], ShardEntry]
    ) -> list[ShardEntry]:
        """Put the shards of the frames not in ``have``, one per grid. A shard of the same
        frames put by an earlier attempt of this commit (``written``, updated) is not put
        again: after a conflict with a writer of other frames, the retry commits the shards
        it already wrote."""
        groups: dict[tuple[int, int], list[int]] = {}
        seen = set(have)
        for k, (f, t) in enumerate(zip(frames, features, strict=True)):
            if f.frame_id in seen:
                continue
            seen.add(f.frame_id)
            groups.setdefault(tuple(t.shape[1:]), []).append(k)
        new = []
        for grid, idxs in groups.items():
            if tuple(idxs) in written:
                new.append(written[tuple(idxs)])
                continue
            feats = torch.stack([features[k] for k in idxs])
            valid = torch.tensor([frames[k].valid for k in idxs], dtype=torch.int32)
            data = encode_shard(feats, valid, dtype)
            digest = hashlib.sha256(data).hexdigest()
            name = f"{digest[:20]}.safetensors"  # content-addressed: the same frames, the same name
            self.objects.put(SHARDS + name, data)
            written[tuple(idxs)] = ShardEntry(name=name, sha256=digest, bytes=len(data), grid=grid,
                                              frames=tuple(frames[k] for k in idxs), crc64nvme=crc64nvme(data))
            new.append(written[tuple(idxs)])
        return new
