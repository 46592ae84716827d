"""Indexing: frames -> features -> store shards."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass, field

import torch

from dtm_ops.errors import FeatureStoreError, InputError, UnreadableFrame
from dtm_ops.features import FeatureExtractor
from dtm_ops.media import FrameRef, map_frames
from dtm_ops.projection import Projection
from dtm_ops.store.format import FrameEntry
from dtm_ops.store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class IndexReport:
    added: int  #: frames indexed now
    skipped: int  #: frames the store held already
    shards: int  #: shards written
    #: frames left out because their content cannot be had (a damaged image or video, a file
    #: deleted since it was listed): ``{"frame_id", "source", "reason"}`` each, in order. They
    #: are not in the store, so the next run tries them again.
    unreadable: list[dict] = field(default_factory=list)


def _left_out(unreadable: list[dict]) -> Callable[[FrameRef, UnreadableFrame], None]:
    """What :func:`dtm_ops.media.map_frames` calls with a frame it cannot read: logged and kept."""
    def note(ref: FrameRef, exc: UnreadableFrame) -> None:
        log.warning("left out unreadable frame %s: %s", ref.frame_id, exc)
        unreadable.append({"frame_id": ref.frame_id, "source": ref.source, "reason": exc.reason})

    return note


def fit_projection(
    extractor: FeatureExtractor, refs: Sequence[FrameRef], dim: int, *, sample_frames: int = 64, max_positions: int = 50_000
) -> Projection:
    """PCA on per-position features of frames sampled evenly from ``refs`` (unreadable ones
    left out: indexing names them)."""
    step = max(1, len(refs) // sample_frames)
    sample = list(refs[::step])[:sample_frames]
    positions = []
    def features(image):
        return extractor.extract([image], project=False)[0]

    for _ref, ff in map_frames(sample, features, workers=1, on_unreadable=lambda ref, exc: None):
        r, c = ff.valid  # frames decoded as indexing decodes them
        positions.append(ff.features[:, :r, :c].reshape(ff.features.shape[0], -1).T)
    if not positions:
        raise InputError(f"none of the {len(sample)} frames sampled to fit the projection is readable",
                         source=sample[0].source if sample else None, field="frames")
    x = torch.cat(positions)
    if x.shape[0] > max_positions:
        x = x[torch.linspace(0, x.shape[0] - 1, max_positions).long()]
    return Projection.fit(x, dim)


def extractor_for_store(
    store: FeatureStore, *, weights: str | None = None, device: str | None = None, batch_size: int = 8
) -> FeatureExtractor:
    """The feature extractor that made ``store`` (same backbone, layer, preprocessing, projection)."""
    fp = store.manifest().fingerprint
    extractor = FeatureExtractor(
        fp.backbone,
        fp.layer,
        long_side=int(fp.preprocess["long_side"]),
        reduced_decode=bool(fp.preprocess.get("reduced_decode", False)),  # absent: indexed before it
        weights=weights,
        projection=store.projection(),
        device=device,
        batch_size=batch_size,
    )
    extractor.fingerprint.check_same(fp, what=f"features in {store.uri}")
    return extractor


def default_loader_workers(device: torch.device) -> int:
    """Loader threads for indexing with the network on ``device``.

    On a GPU, every core but the one that drives the GPU: there loading is the slow stage
    (H200 box, ``benchmarks/results/speed/h200/index.txt``: 1080p JPEGs loaded at 225
    frames/s on 8 threads of its 16 cores, the network ran at 2040). On the CPU 1, frames
    loaded before each batch: the network keeps every core busy, and loading beside it
    made indexing slower (``benchmarks/bench_index.py``).
    """
    if device.type != "cuda":
        return 1
    return max(1, min(32, (os.cpu_count() or 2) - 1))


def index_frames(
    refs: Sequence[FrameRef],
    store: FeatureStore,
    extractor: FeatureExtractor,
    *,
    shard_frames: int = 256,
    dtype: str = "float16",
    pca_dim: int | None = None,
    progress: bool = False,
    loader_workers: int | None = None,
) -> IndexReport:
    """Extract features of the frames not yet in ``store`` and append them as shards.

    Re-running on the same frames adds nothing. A frame whose content cannot be had (a
    damaged file, one deleted since it was listed) is left out, logged and listed in
    :attr:`IndexReport.unreadable`, and the others are indexed: one bad file in a lake of
    millions must not stop its batch on every run. A storage error is raised, for the
    task to retry. ``pca_dim`` fits a projection on the
    first run (a store keeps its projection: later runs reuse it). ``loader_workers``:
    threads that read, decode and preprocess frames ahead of the network
    (:func:`dtm_ops.media.map_frames`); default :func:`default_loader_workers`.
    """
    from tqdm import tqdm

    if store.exists():
        manifest = store.manifest()
        if pca_dim is not None and store.projection() is None:
            raise FeatureStoreError(f"{store.uri}: store exists without a projection; cannot add one (pca_dim={pca_dim})")
        extractor.projection = store.projection()
        extractor.fingerprint.check_same(manifest.fingerprint, what=f"features in {store.uri}")
        have = manifest.frame_ids()
    else:
        have = set()
        if pca_dim is not None:
            extractor.projection = fit_projection(extractor, refs, pca_dim)
            store.save_projection(extractor.projection)
    todo = [r for r in refs if r.frame_id not in have]
    if loader_workers is None:
        loader_workers = default_loader_workers(extractor.device)
    fp = extractor.fingerprint
    # float16 stores take float16 features from the extractor: cast where they were computed, so a GPU
    # copies half the bytes back (the same values: the store casts float32 ones the same way)
    copy_dtype = torch.float16 if dtype == "float16" else torch.float32
    shards = 0
    entries: list[FrameEntry] = []
    feats: list[torch.Tensor] = []
    frames, pending = [], []

    def flush_batch() -> None:
        for ref, ff in zip(pending, extractor.extract_frames(frames, dtype=copy_dtype)):
            entries.append(
                FrameEntry(
                    frame_id=ref.frame_id,
                    source=ref.source,
                    sequence=ref.sequence,
                    index=ref.index,
                    width=ff.size[0],
                    height=ff.size[1],
                    valid=ff.valid,
                    scale=ff.scale,
                )
            )
            feats.append(ff.features)
        frames.clear()
        pending.clear()

    def flush_shard() -> None:
        nonlocal shards
        shards += len(store.append(fp, entries, feats, dtype=dtype))
        entries.clear()
        feats.clear()

    # reading, decoding and preprocessing, on worker threads ahead of the network on a GPU
    unreadable: list[dict] = []
    loaded = map_frames(todo, extractor.prepare_frame, workers=loader_workers, ahead=2 * extractor.batch_size,
                        on_unreadable=_left_out(unreadable))
    with closing(loaded), tqdm(total=len(todo), unit="frame", disable=not progress, desc="index") as bar:
        for ref, frame in loaded:
            frames.append(frame)
            pending.append(ref)
            if len(frames) == extractor.batch_size:
                flush_batch()
                bar.update(extractor.batch_size)
            if len(entries) >= shard_frames:
                flush_shard()
        n = len(frames)
        flush_batch()
        bar.update(n)
        if entries:
            flush_shard()
    return IndexReport(added=len(todo) - len(unreadable), skipped=len(refs) - len(todo), shards=shards,
                       unreadable=unreadable)


def plan_index_batches(frames_uri: str, features_uri: str, batch_frames: int, max_tasks: int) -> list[str]:
    """Cut the frames not yet indexed into at most ``max_tasks`` batches of at least
    ``batch_frames``; each batch's frame list is written under ``staging/`` of the store
    (named by its content, so a re-run overwrites it; :meth:`FeatureStore.gc` deletes it
    later) and its key returned."""
    import hashlib
    import json
    import math
    from dataclasses import asdict

    from dtm_ops.media import list_frames
    from dtm_ops.store import FeatureStore
    from dtm_ops.store.feature_store import STAGING

    store = FeatureStore.open(features_uri)
    have = store.manifest().frame_ids() if store.exists() else set()
    todo = [asdict(r) for r in list_frames(frames_uri) if r.frame_id not in have]
    size = max(batch_frames, math.ceil(len(todo) / max(1, max_tasks)))
    keys = []
    for start in range(0, len(todo), size):
        blob = json.dumps(todo[start : start + size]).encode()
        key = f"{STAGING}index-batch-{hashlib.sha256(blob).hexdigest()[:16]}.json"
        store.objects.put(key, blob)
        keys.append(key)
    return keys


def index_batch(batch_key: str, features_uri: str, *, dtype: str = "float16", device: str | None = None) -> dict:
    """Index one planned batch (see :func:`plan_index_batches`) into the store."""
    import json

    from dtm_ops.store import FeatureStore

    store = FeatureStore.open(features_uri)
    refs = [FrameRef(**r) for r in json.loads(store.objects.get(batch_key))]
    extractor = extractor_for_store(store, device=device) if store.exists() else FeatureExtractor(device=device)
    report = index_frames(refs, store, extractor, dtype=dtype)
    return {"batch": batch_key, "added": report.added, "skipped": report.skipped, "shards": report.shards,
            "unreadable": report.unreadable}


def summarize_index(features_uri: str, batches: list[dict]) -> dict:
    """The index run's summary from its batches' (:func:`index_batch`): frames added, the
    store's version and size, and the frames left out as unreadable (each logged; the
    summary lists the first 100)."""
    from dtm_ops.store import FeatureStore

    store = FeatureStore.open(features_uri)
    unreadable = [u for b in batches for u in b.get("unreadable", [])]
    for u in unreadable:
        log.warning("left out unreadable frame %s (%s): %s", u["frame_id"], u["source"], u["reason"])
    out = {"added": sum(b["added"] for b in batches), "version": store.latest_version(), "features": features_uri,
           "unreadable": len(unreadable), "unreadable_frames": unreadable[:100]}
    if out["version"]:
        out["frames"] = store.manifest().frame_count
    return out
