"""The feature store on both backends (a local folder and a real S3 server): round trip,
versions, atomic commits, concurrent writers, compression, and every integrity failure."""

from __future__ import annotations

import re
import threading

import pytest
import torch

from dtm_ops.errors import FeatureStoreError, FingerprintMismatch
from dtm_ops.fingerprint import Fingerprint
from dtm_ops.store import FeatureStore
from dtm_ops.store.feature_store import POINTER, SHARDS, manifest_key
from dtm_ops.store.format import FrameEntry, Manifest, shard_layout
from dtm_ops.store.objects import ObjectNotFound

FP = Fingerprint(backbone="b", weights="w" * 64, layer="l", stride=16, channels=4, preprocess={"long_side": 64})


def _frames(n: int, grid=(3, 5), prefix="f", seed=0):
    g = torch.Generator().manual_seed(seed)
    entries = [FrameEntry(f"{prefix}{i}", f"/x/{prefix}{i}.jpg", "seq", i, 80, 48, grid, 1.0) for i in range(n)]
    feats = [torch.nn.functional.normalize(torch.randn(4, *grid, generator=g), dim=0) for _ in range(n)]
    return entries, feats


def _open(store_uri, **kw) -> FeatureStore:
    uri, cfg = store_uri
    return FeatureStore.open(uri, s3_config=cfg, **kw)


def _all_frames(store: FeatureStore) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    got = {}
    for entry, feats, valid in store.iter_shards():
        for k, fr in enumerate(entry.frames):
            assert fr.frame_id not in got, f"frame {fr.frame_id} stored twice"
            got[fr.frame_id] = (feats[k], valid[k])
    return got


def _watch_reads(store: FeatureStore, note) -> list:
    """Call ``note(key, offset, length)`` as each read of ``store`` starts; returns the list
    the notes are collected in."""
    calls = []
    read_into = store.objects.read_into

    def watched(key, out, offset=0):
        calls.append(note(key, offset, len(out)))
        read_into(key, out, offset)

    store.objects.read_into = watched
    return calls


def test_round_trip_groups_by_grid_and_skips_known_frames(store_uri):
    store = _open(store_uri)
    e1, f1 = _frames(3, (3, 5), "a")
    e2, f2 = _frames(2, (4, 4), "b")
    new = store.append(FP, e1 + e2, f1 + f2)
    assert sorted(s.grid for s in new) == [(3, 5), (4, 4)]
    assert store.append(FP, e1, f1) == []  # nothing new: no new version
    assert store.latest_version() == 1
    got = _all_frames(_open(store_uri))  # a fresh reader
    assert set(got) == {"a0", "a1", "a2", "b0", "b1"}
    torch.testing.assert_close(got["a1"][0].float(), f1[1], atol=1e-3, rtol=0)  # fp16 storage
    assert got["b0"][1].tolist() == [4, 4]


def test_versions_are_immutable_snapshots_and_a_lagging_pointer_is_harmless(store_uri):
    store = _open(store_uri)
    store.append(FP, *_frames(2, prefix="a"))
    store.append(FP, *_frames(3, prefix="b"))
    assert store.latest_version() == 2
    assert store.manifest(1).frame_count == 2 and store.manifest(2).frame_count == 5
    store.objects.put(POINTER, b'{"version": 1}')  # a writer died before moving the pointer
    reader = _open(store_uri)
    assert reader.latest_version() == 2 and reader.manifest().frame_count == 5


def test_concurrent_writers_lose_and_duplicate_nothing(store_uri):
    """Four writers at once, with overlapping frames: every frame is stored exactly once."""
    batches = [_frames(6, prefix="p", seed=1)] * 2 + [_frames(5, prefix=f"w{i}", seed=i) for i in range(2)]
    errors = []
    start = threading.Barrier(len(batches))

    def write(entries, feats):
        try:
            start.wait()
            _open(store_uri).append(FP, entries, feats)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=b) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    got = _all_frames(_open(store_uri))
    assert set(got) == {f"p{i}" for i in range(6)} | {f"w{i}{j}" for i in range(2) for j in range(5)}


def test_int8_round_trip_error_is_small(store_uri):
    store = _open(store_uri)
    entries, feats = _frames(4, (6, 7))
    store.append(FP, entries, feats, dtype="int8")
    got = _all_frames(store)
    worst = max((got[e.frame_id][0].float() - f).abs().max().item() for e, f in zip(entries, feats))
    assert worst <= 1 / 127 + 1e-3  # half a quantisation step of the largest component, and fp16
    with pytest.raises(FeatureStoreError, match="store holds int8 features"):
        store.append(FP, *_frames(1, (6, 7), prefix="z"), dtype="float16")


def test_corrupted_shard_is_named(store_uri):
    store = _open(store_uri)
    (entry,) = store.append(FP, *_frames(2))
    data = bytearray(store.objects.get(SHARDS + entry.name))
    data[-10] ^= 0xFF
    store.objects.put(SHARDS + entry.name, bytes(data))
    with pytest.raises(FeatureStoreError, match=rf"shard {entry.name}: checksum mismatch \(crc64nvme"):
        list(store.iter_shards())


def _crc64nvme_bitwise(data: bytes) -> int:
    """CRC-64/NVME bit by bit, from its definition (reflected polynomial 0x9A6C9329AC4BC9B5,
    initial value and final xor all ones)."""
    crc = (1 << 64) - 1
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x9A6C9329AC4BC9B5 if crc & 1 else 0)
    return crc ^ ((1 << 64) - 1)


def test_crc64nvme_matches_the_definition():
    from dtm_ops.store.format import crc64nvme

    assert crc64nvme(b"123456789") == "ae8b14860a799888"  # the catalogued check value
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (3001,), generator=g, dtype=torch.uint8).numpy().tobytes()
    assert crc64nvme(data) == f"{_crc64nvme_bitwise(data):016x}"
    assert crc64nvme(memoryview(data)[1:]) == f"{_crc64nvme_bitwise(data[1:]):016x}"


def test_shards_of_manifests_without_a_crc_are_checked_by_sha256(store_uri):
    """Manifests written before the CRC field: their shards read, and a corrupt one is named."""
    import dataclasses

    store = _open(store_uri)
    (entry,) = store.append(FP, *_frames(2))
    manifest = store.manifest()
    assert entry.crc64nvme is not None and manifest.shards[0].crc64nvme == entry.crc64nvme
    manifest.shards = [dataclasses.replace(s, crc64nvme=None) for s in manifest.shards]
    store.objects.put(manifest_key(manifest.version), manifest.to_bytes())
    legacy = _open(store_uri)
    assert legacy.manifest().shards[0].crc64nvme is None
    assert len(list(legacy.iter_shards())) == 1
    data = bytearray(store.objects.get(SHARDS + entry.name))
    data[-10] ^= 0xFF
    store.objects.put(SHARDS + entry.name, bytes(data))
    with pytest.raises(FeatureStoreError, match=rf"shard {entry.name}: checksum mismatch \(sha256"):
        list(_open(store_uri).iter_shards())


def test_missing_shard_and_unknown_version(store_uri):
    store = _open(store_uri)
    (entry,) = store.append(FP, *_frames(2))
    store.objects.delete(SHARDS + entry.name)
    with pytest.raises(FeatureStoreError, match=f"shard {entry.name} named by the manifest is missing"):
        list(store.iter_shards())
    future = Manifest(fingerprint=FP, format_version=99, version=2)
    store.objects.put(manifest_key(2), future.to_bytes())
    with pytest.raises(FeatureStoreError, match="unknown feature-store format version 99"):
        _open(store_uri).manifest()


def test_nan_features_are_refused_naming_the_frame(store_uri):
    entries, feats = _frames(3)
    feats[2][1, 0, 0] = float("nan")
    store = _open(store_uri)
    with pytest.raises(FeatureStoreError, match="frame 'f2': field 'features' holds NaN"):
        store.append(FP, entries, feats)
    assert store.latest_version() == 0 and not list(store.objects.list(SHARDS))


def test_other_fingerprint_is_refused(store_uri):
    store = _open(store_uri)
    store.append(FP, *_frames(1))
    other = Fingerprint(backbone="b", weights="w" * 64, layer="other", stride=16, channels=4, preprocess={"long_side": 64})
    with pytest.raises(FingerprintMismatch, match="layer"):
        store.append(other, *_frames(1, prefix="z"))


def test_missing_store_is_a_clear_error(store_uri):
    with pytest.raises(FeatureStoreError, match="run 'dtm extract' first"):
        _open(store_uri).manifest()


def test_streaming_keeps_order_and_prefetch_budget(store_uri):
    store = _open(store_uri, prefetch_bytes=1)  # budget below one shard: one at a time
    for i in range(5):
        store.append(FP, *_frames(2, (3, 3 + i), prefix=f"s{i}"))
    names = [s.name for s in store.manifest().shards]
    assert [e.name for e, _, _ in store.iter_shards()] == names
    wide = _open(store_uri, prefetch_bytes=1 << 30)
    assert [e.name for e, _, _ in wide.iter_shards()] == names


def test_the_next_shard_is_read_while_the_caller_holds_one(store_uri):
    """Even with a budget below one shard, a shard is in flight while the caller works on the
    one before it: reading and matching overlap (with the budget spent, the next GET used to
    wait until the caller asked for the next shard)."""
    store = _open(store_uri, prefetch_bytes=1)
    for i in range(3):
        store.append(FP, *_frames(2, (3, 3 + i), prefix=f"s{i}"))
    names = [s.name for s in store.manifest().shards]
    reader = _open(store_uri, prefetch_bytes=1)
    started = {n: threading.Event() for n in names}
    _watch_reads(reader, lambda key, offset, length: started[key.rsplit("/", 1)[-1]].set())
    seen = []
    for entry, _, _ in reader.iter_shards():
        seen.append(entry.name)
        if len(seen) < len(names):  # the caller is busy with this shard: the next one is read meanwhile
            k = len(seen)
            assert started[names[k]].wait(10), f"shard {k} not read while shard {k - 1} was held"
    assert seen == names


def test_ranged_gets_go_out_in_shard_order(s3_server, s3_bucket, monkeypatch):
    """Parts of the earliest shard go first, so shards arrive one after the other, not all at
    the end together (S3, several parts per shard, fewer threads than parts; a folder reads
    each shard whole)."""
    from dtm_ops.store import feature_store

    store_uri = (f"s3://{s3_bucket}/features/v1", s3_server.config())
    store = _open(store_uri)
    for i in range(4):
        store.append(FP, *_frames(6, (3, 3 + i), prefix=f"s{i}"))
    shards = store.manifest().shards
    part = min(s.bytes for s in shards) // 4
    monkeypatch.setattr(feature_store, "MIN_PART_BYTES", part)
    monkeypatch.setattr(feature_store, "PART_BYTES", part)
    reader = _open(store_uri, workers=2, prefetch_bytes=1 << 30)
    order = {"shards/" + s.name: i for i, s in enumerate(shards)}
    calls = _watch_reads(reader, lambda key, offset, length: order[key])
    assert [e.name for e, _, _ in reader.iter_shards()] == [s.name for s in shards]
    assert all(calls.count(i) >= 4 for i in range(4)) and set(calls) == set(range(4))  # parts of every shard
    # GETs start in queue order; two threads may log two neighbours the other way round
    late = [j for j in range(2, len(calls)) if calls[j] < max(calls[: j - 1])]
    assert not late, f"GETs out of shard order at {late}: {calls}"


def test_a_commit_that_fails_after_its_shards_leaves_the_old_version_whole(store_uri, monkeypatch):
    store = _open(store_uri)
    store.append(FP, *_frames(2, prefix="a"))
    put = store.objects.put

    def failing_put(key, data, *, exclusive=False):
        if key.startswith("manifests/"):
            raise FeatureStoreError("simulated crash before the manifest")
        return put(key, data, exclusive=exclusive)

    monkeypatch.setattr(store.objects, "put", failing_put)
    with pytest.raises(FeatureStoreError, match="simulated crash"):
        store.append(FP, *_frames(3, prefix="b"))
    reader = _open(store_uri)
    assert reader.latest_version() == 1
    assert set(_all_frames(reader)) == {"a0", "a1"}  # the orphan shard is invisible


def test_the_same_tensors_give_the_same_shard_bytes_in_any_process():
    """A shard's name is the hash of its bytes: the same frames must give the same bytes
    every time (safetensors writes a multi-key metadata in hash-map order), and a shard
    still opens with safetensors' own loader."""
    import hashlib
    import subprocess
    import sys

    from safetensors.torch import load

    from dtm_ops.store.format import encode_shard

    make = ("import torch; g = torch.Generator().manual_seed(5); "
            "x = torch.randn(3, 4, 3, 5, generator=g); v = torch.tensor([[3, 5]] * 3)")
    scope: dict = {}
    exec(make, scope)
    for dtype in ("float16", "float32", "int8"):
        blobs = {encode_shard(scope["x"], scope["v"], dtype) for _ in range(20)}
        assert len(blobs) == 1, dtype
        there = subprocess.run(
            [sys.executable, "-c", make + "; import hashlib; from dtm_ops.store.format import encode_shard; "
             f"print(hashlib.sha256(encode_shard(x, v, {dtype!r})).hexdigest())"],
            capture_output=True, text=True, check=True).stdout.strip()
        (blob,) = blobs
        assert there == hashlib.sha256(blob).hexdigest(), dtype
        assert torch.equal(load(blob)["valid"], scope["v"].int())


def test_a_commit_retried_after_a_conflict_puts_each_shard_once(store_uri, monkeypatch):
    """Another writer commits between our shards and our manifest: the retry commits the
    shards already put, without putting them again, and leaves no shard no manifest names."""
    store = _open(store_uri)
    store.append(FP, *_frames(2, prefix="a"))
    other = _open(store_uri)
    shard_puts = []
    put = store.objects.put

    def racing_put(key, data, *, exclusive=False):
        if key.startswith(SHARDS):
            shard_puts.append(key)
        elif key.startswith("manifests/") and other.latest_version() == 1:
            other.append(FP, *_frames(3, prefix="c", seed=2))  # takes the version we are about to write
        return put(key, data, exclusive=exclusive)

    monkeypatch.setattr(store.objects, "put", racing_put)
    e1, f1 = _frames(3, (3, 5), "b")
    e2, f2 = _frames(2, (4, 4), "b2")
    new = store.append(FP, e1 + e2, f1 + f2)
    assert store.latest_version() == 3 and len(new) == 2
    assert sorted(shard_puts) == sorted(SHARDS + s.name for s in new)  # each put once
    named = {SHARDS + s.name for s in _open(store_uri).manifest().shards}
    assert set(store.objects.list(SHARDS)) == named
    assert set(_all_frames(_open(store_uri))) == {"a0", "a1", "c0", "c1", "c2", "b0", "b1", "b2", "b20", "b21"}


@pytest.mark.parametrize("dtype", ["float16", "float32", "int8"])
def test_a_few_frames_of_a_shard_are_read_as_checked_byte_ranges(store_uri, dtype):
    """Two frames of two 64-frame shards: only their byte ranges (and each shard's header and
    tables) are read, and they equal the frames of the whole shards."""
    from safetensors.torch import load

    from dtm_ops.store.format import crc64nvme

    store = _open(store_uri)
    store.append(FP, *_frames(64, (30, 40), prefix="a", seed=1), dtype=dtype)  # 9.6 kB a frame in float16
    store.append(FP, *_frames(64, (30, 40), prefix="b", seed=2), dtype=dtype)
    whole = _all_frames(_open(store_uri))
    shard_bytes = {SHARDS + s.name: s.bytes for s in store.manifest().shards}
    reads = _watch_reads(store, lambda key, offset, length: (key, offset, length))
    got = store.frame_features(["a3", "b15"])
    assert set(got) == {"a3", "b15"}
    for fid, (entry, features) in got.items():
        assert entry.frame_id == fid and torch.equal(features, whole[fid][0])
    # each frame's checksum, by its definition: CRC-64/NVME of its features, scales and valid rows
    for shard in store.manifest().shards:
        tensors = load(store.objects.get(SHARDS + shard.name))
        for r in (0, 7, 63):
            rows = b"".join(tensors[k][r].numpy().tobytes() for k in ("features", "scales", "valid") if k in tensors)
            assert tensors["frame_crc64"][r].numpy().tobytes() == int(crc64nvme(rows), 16).to_bytes(8, "little")
    assert all(length < shard_bytes[key] / 8 for key, _, length in reads)
    assert sum(length for _, _, length in reads) < sum(shard_bytes.values()) / 8


def test_a_corrupt_frame_read_as_ranges_is_named_and_its_neighbours_still_read(store_uri):
    store = _open(store_uri)
    store.append(FP, *_frames(16, prefix="a"))
    (entry,) = store.manifest().shards
    data = bytearray(store.objects.get(SHARDS + entry.name))
    begin, _ = shard_layout(data, len(data)).row("features", 3)  # frame a3's first feature byte
    data[begin + 5] ^= 0x10
    store.objects.put(SHARDS + entry.name, bytes(data))
    with pytest.raises(FeatureStoreError, match=rf"shard {entry.name}: frame 'a3': checksum mismatch"):
        store.frame_features(["a3"])
    fine = store.frame_features(["a4"])
    torch.testing.assert_close(fine["a4"][1].float(), _frames(16, prefix="a")[1][4], atol=1e-3, rtol=0)


def test_shards_without_frame_checksums_are_read_whole(store_uri, monkeypatch):
    """Shards written before per-frame checksums: frame_features reads them whole."""
    from safetensors.torch import save

    from dtm_ops.store import feature_store

    def old_encode(features, valid, dtype="float16"):
        return save({"valid": valid.to(torch.int32).contiguous(), "features": features.to(torch.float16).contiguous()},
                    metadata={"format": "dtm-shard/1"})

    monkeypatch.setattr(feature_store, "encode_shard", old_encode)
    store = _open(store_uri)
    entries, feats = _frames(16, prefix="a")
    store.append(FP, entries, feats)
    (entry,) = store.manifest().shards
    reads = _watch_reads(store, lambda key, offset, length: length if key == SHARDS + entry.name else 0)
    got = store.frame_features(["a3"])
    torch.testing.assert_close(got["a3"][1].float(), feats[3], atol=1e-3, rtol=0)
    assert sum(reads) >= entry.bytes  # the header, then the whole shard


def test_s3_config_from_an_airflow_aws_connection():
    from dtm_ops.store.objects import S3Config

    cfg = S3Config.from_aws_connection("AKIA", "s3cr3t", {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"})
    assert (cfg.endpoint_url, cfg.region, cfg.access_key, cfg.secret_key) == ("http://127.0.0.1:9000", "eu-west-1", "AKIA", "s3cr3t")
    assert "s3cr3t" not in repr(cfg) and "AKIA" not in repr(cfg)
    nested = S3Config.from_aws_connection(None, None, {"service_config": {"s3": {"endpoint_url": "http://x"}}})
    assert nested.endpoint_url == "http://x" and nested.access_key is None


def test_s3_attempts_are_attempts_in_all_and_the_connection_sets_them_as_botocore_reads_it(monkeypatch):
    """``max_attempts`` counts every try, as the error message after the last one says;
    botocore's own ``max_attempts`` counts retries after the first. A connection's
    ``config_kwargs.retries`` (what the Amazon provider hands botocore) is read that way;
    without it the environment's DTM_S3_MAX_ATTEMPTS, else 5; a wrong one names its field."""
    from dtm_ops.errors import InputError
    from dtm_ops.store.objects import S3Config

    def total(cfg):  # what the boto3 client was configured with
        return cfg.client().meta.config.retries["total_max_attempts"]

    monkeypatch.delenv("DTM_S3_MAX_ATTEMPTS", raising=False)
    assert S3Config.from_aws_connection(None, None, {}).max_attempts == 5 == total(S3Config())
    monkeypatch.setenv("DTM_S3_MAX_ATTEMPTS", "7")
    assert S3Config.from_aws_connection(None, None, {}).max_attempts == 7
    retries = S3Config.from_aws_connection(None, None, {"config_kwargs": {"retries": {"max_attempts": 10}}})
    assert retries.max_attempts == 11 == total(retries)
    attempts = S3Config.from_aws_connection(None, None, {"config_kwargs": {"retries": {"total_max_attempts": 3}}})
    assert attempts.max_attempts == 3 == total(attempts)
    with pytest.raises(InputError, match="^connection aws_default: field 'extra.config_kwargs.retries.max_attempts': "
                                         "expected a whole number >= 0, got -1$"):
        S3Config.from_aws_connection(None, None, {"config_kwargs": {"retries": {"max_attempts": -1}}},
                                     source="connection aws_default")


def test_read_into_fills_the_buffer_from_the_offset_and_names_a_short_object(store_uri, monkeypatch):
    objects = _open(store_uri).objects
    data = bytes(range(256)) * 40
    objects.put("blob", data)
    if store_uri[1] is not None:  # S3: straight from the socket, never through an intermediate bytes object
        from botocore.response import StreamingBody

        monkeypatch.setattr(StreamingBody, "read", lambda *a, **k: pytest.fail("read_into went through body.read()"))
    out = bytearray(1000)
    objects.read_into("blob", memoryview(out)[100:900], 5000)
    assert out[:100] == bytes(100) and out[100:900] == data[5000:5800] and out[900:] == bytes(100)
    with pytest.raises(FeatureStoreError, match="blob"):
        objects.read_into("blob", memoryview(bytearray(500)), len(data) - 200)
    with pytest.raises(ObjectNotFound, match="nope"):
        objects.read_into("nope", memoryview(bytearray(8)))


def test_large_shards_come_whole_or_in_ranged_parts_by_backend(store_uri, monkeypatch):
    """S3 fetches a shard above PART_BYTES as parallel ranged GETs into one buffer, a folder
    in one read; either way the features are those written."""
    from dtm_ops.store import feature_store

    store = _open(store_uri)
    entries, feats = _frames(6)
    store.append(FP, entries, feats)
    (shard,) = store.manifest().shards
    part = shard.bytes // 3
    monkeypatch.setattr(feature_store, "PART_BYTES", part)
    reader = _open(store_uri)
    calls = _watch_reads(reader, lambda key, offset, length: (offset, length))
    got = _all_frames(reader)
    if store_uri[1] is None:
        assert calls == [(0, shard.bytes)]
    else:
        assert sorted(calls) == [(o, min(part, shard.bytes - o)) for o in range(0, shard.bytes, part)]
    for e, f in zip(entries, feats):
        torch.testing.assert_close(got[e.frame_id][0].float(), f, atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- garbage
def _orphan_shard(store_uri, frames) -> str:
    """Put a shard of ``frames`` as a writer that dies before its commit does; its key."""
    store = _open(store_uri)
    put = store.objects.put
    shards = []

    def dying_put(key, data, *, exclusive=False):
        if key.startswith("manifests/"):
            raise FeatureStoreError("simulated crash before the manifest")
        shards.append(key)
        return put(key, data, exclusive=exclusive)

    store.objects.put = dying_put
    with pytest.raises(FeatureStoreError, match="simulated crash"):
        store.append(FP, *frames)
    (key,) = shards
    return key


def test_gc_deletes_unnamed_shards_and_staging_only_after_the_grace_period(store_uri):
    import time

    from dtm_ops.store.feature_store import GC_GRACE_S, STAGING

    store = _open(store_uri)
    store.append(FP, *_frames(2, prefix="a"))
    store.append(FP, *_frames(3, (4, 4), prefix="b"))  # version 2 names the shards of version 1 too
    orphan = _orphan_shard(store_uri, _frames(3, prefix="c", seed=3))
    staged = STAGING + "index-batch-0123456789abcdef.json"
    store.objects.put(staged, b'[{"uri": "/x/c0.jpg"}]')
    named = {SHARDS + s.name for s in store.manifest().shards}
    assert len(named) == 2 and orphan not in named
    before = _all_frames(_open(store_uri))
    sizes = {orphan: store.objects.size(orphan), staged: len(b'[{"uri": "/x/c0.jpg"}]')}

    fresh = _open(store_uri).gc()  # everything was written just now: all of it is kept
    assert (fresh.version, fresh.named, fresh.deleted, fresh.missing) == (2, 2, (), ())
    assert set(fresh.young) == {orphan, staged}

    later = time.time() + GC_GRACE_S + 60
    dry = _open(store_uri).gc(now=later, dry_run=True)
    assert set(dry.deleted) == {orphan, staged} and dry.deleted_bytes == sum(sizes.values())
    assert store.objects.size(orphan) is not None and store.objects.size(staged) is not None  # nothing deleted

    done = _open(store_uri).gc(now=later)
    assert set(done.deleted) == {orphan, staged} and done.deleted_bytes == sum(sizes.values()) and not done.young
    assert set(store.objects.list(SHARDS)) == named and list(store.objects.list(STAGING)) == []
    reader = _open(store_uri)
    after = _all_frames(reader)
    assert set(after) == set(before) == {"a0", "a1", "b0", "b1", "b2"}
    assert all(torch.equal(after[k][0], before[k][0]) for k in before)
    assert {f.frame_id for s in reader.manifest(1).shards for f in s.frames} == {"a0", "a1"}
    for s in reader.manifest(1).shards:  # an old version still reads whole
        reader.read_shard(s)
    assert _open(store_uri).gc(now=later).deleted == ()  # nothing left to do


def test_gc_keeps_a_shard_committed_while_it_runs(store_uri):
    """Another writer commits between gc's two looks at the store (its shard list and the
    manifest), whichever it takes first: the new shard is kept, even with no grace."""
    store = _open(store_uri)
    store.append(FP, *_frames(2, prefix="a"))
    gc_store, other = _open(store_uri), _open(store_uri)
    list_info, get = gc_store.objects.list_info, gc_store.objects.get
    state = {"committed": False}

    def commit_once():
        if not state["committed"]:
            state["committed"] = True
            other.append(FP, *_frames(2, (4, 4), prefix="b", seed=1))

    def listing(prefix=""):
        out = list(list_info(prefix))
        if prefix == SHARDS:
            commit_once()
        return iter(out)

    def getting(key):
        out = get(key)
        if key.startswith("manifests/"):
            commit_once()
        return out

    gc_store.objects.list_info, gc_store.objects.get = listing, getting
    report = gc_store.gc(grace_s=0, now=2e9)
    assert state["committed"] and report.deleted == ()
    assert set(_all_frames(_open(store_uri))) == {"a0", "a1", "b0", "b1"}


def test_gc_names_missing_shards_and_refuses_a_place_with_no_store(store_uri, tmp_path):
    store = _open(store_uri)
    store.append(FP, *_frames(2, prefix="a"))
    store.append(FP, *_frames(2, (4, 4), prefix="b"))
    lost = SHARDS + store.manifest().shards[0].name
    store.objects.delete(lost)
    report = _open(store_uri).gc(grace_s=0, now=2e9)
    assert report.missing == (lost,) and report.deleted == () and report.named == 2
    with pytest.raises(FeatureStoreError, match=f"1 shard\\(s\\) named by manifest version 2 are missing: {lost}"):
        report.check()
    report.__class__(**{**report.__dict__, "missing": ()}).check()  # nothing missing: no error
    with pytest.raises(FeatureStoreError, match="no feature store here"):
        FeatureStore.open(tmp_path / "nothing").gc()
    with pytest.raises(ValueError, match="grace_s"):
        store.gc(grace_s=-1)


def test_delete_many_takes_keys_in_batches_and_ignores_absent_ones(store_uri, monkeypatch):
    """On S3, one DeleteObjects request per DELETE_BATCH keys (2 here: 5 keys, 3 requests);
    a folder deletes one by one. Each request is told to ``on_done`` once it is answered.
    Keys that do not exist are no error; others stay."""
    from dtm_ops.store import objects

    store = _open(store_uri)
    keys = [f"staging/batch-{k}.json" for k in range(4)]
    for key in keys + ["staging/keep.json"]:
        store.objects.put(key, b"[]")
    monkeypatch.setattr(objects, "DELETE_BATCH", 2)
    requests = []
    if store_uri[1] is not None:
        client = store.objects.client
        real = client.delete_objects
        monkeypatch.setattr(client, "delete_objects", lambda **kw: requests.append(len(kw["Delete"]["Objects"]))
                            or real(**kw))
    told = []
    asked = keys + ["staging/never-written.json"]
    assert store.objects.delete_many(asked, on_done=lambda done, refused: told.append((done, refused))) == {}
    assert list(store.objects.list("staging/")) == ["staging/keep.json"]
    on_s3 = store_uri[1] is not None
    assert requests == ([2, 2, 1] if on_s3 else [])
    assert told == ([(asked[0:2], {}), (asked[2:4], {}), (asked[4:], {})] if on_s3 else [([k], {}) for k in asked])
    assert store.objects.delete_many([]) == {}


def test_s3_delete_many_names_each_key_it_could_not_delete(monkeypatch):
    """The keys of S3's per-key errors, under the store's prefix, and every key of a request
    that failed whole, with the reason (a stand-in client: the real server is not made to
    refuse single keys here)."""
    from botocore.exceptions import ClientError

    from dtm_ops.store import objects
    from dtm_ops.store.objects import S3Config, S3ObjectStore

    class Client:
        def __init__(self):
            self.calls = 0

        def delete_objects(self, Bucket, Delete):
            self.calls += 1
            if self.calls == 2:
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "DeleteObjects")
            keys = [o["Key"] for o in Delete["Objects"]]
            return {"Errors": [{"Key": keys[0], "Code": "InternalError", "Message": "try again"}]}

    store = S3ObjectStore("lake", "features/v1", S3Config())
    store._client = Client()
    monkeypatch.setattr(objects, "DELETE_BATCH", 2)
    denied = "s3://lake/features/v1: DELETE 2 keys from c: access denied (AccessDenied); check the S3 credentials"
    told = []
    failed = store.delete_many(["a", "b", "c", "d"], on_done=lambda keys, refused: told.append((keys, refused)))
    assert failed == {"a": "InternalError: try again", "c": denied, "d": denied}
    assert told == [(["a", "b"], {"a": "InternalError: try again"}), (["c", "d"], {"c": denied, "d": denied})]


def test_gc_reports_what_it_could_not_delete_and_deletes_the_rest(tmp_path, monkeypatch, caplog):
    """An object the store refuses to delete is logged with the reason, left out of the
    deleted keys and bytes, and named by ``check``; the other garbage goes."""
    import logging
    import os
    import time

    from dtm_ops.store.feature_store import GC_GRACE_S
    from dtm_ops.store.objects import LocalObjectStore

    root = tmp_path / "store"
    store = FeatureStore.open(root)
    store.append(FP, *_frames(2, prefix="a"))
    stuck, gone = "staging/stuck.json", "staging/gone.json"
    old = time.time() - GC_GRACE_S - 60
    for key in (stuck, gone):
        store.objects.put(key, b"[1]")
        os.utime(root / key, (old, old))
    real = LocalObjectStore.delete

    def delete(self, key):
        if key == stuck:
            raise PermissionError(13, "Permission denied")
        real(self, key)

    monkeypatch.setattr(LocalObjectStore, "delete", delete)
    with caplog.at_level(logging.INFO, logger="dtm_ops.store.feature_store"):
        report = store.gc()
    assert (report.deleted, report.deleted_bytes, report.failed) == ((gone,), 3, (stuck,))
    assert (root / stuck).exists() and not (root / gone).exists()
    assert report.summary()["not_deleted"] == [stuck]
    said = [r.getMessage() for r in caplog.records]
    assert f"{root}: could not delete {stuck} (PermissionError: Permission denied)" in said
    assert not any("deleted " + stuck in m for m in said)
    message = f"1 unused object(s) could not be deleted (see the log): {stuck}"
    with pytest.raises(FeatureStoreError, match=re.escape(message)):
        report.check()


def test_gc_killed_midway_has_logged_each_delete_that_finished(tmp_path, monkeypatch, caplog):
    """gc logs each request of ``delete_many`` as it is answered (a folder deletes one file
    a request): killed during its third delete, it has logged the first two keys, which are
    gone, and nothing else."""
    import logging
    import os
    import time

    from dtm_ops.store.feature_store import GC_GRACE_S
    from dtm_ops.store.objects import LocalObjectStore

    class Killed(BaseException):
        pass

    root = tmp_path / "store"
    store = FeatureStore.open(root)
    store.append(FP, *_frames(2, prefix="a"))
    keys = [f"staging/batch-{k}.json" for k in range(3)]
    old = time.time() - GC_GRACE_S - 60
    for key in keys:
        store.objects.put(key, b"[1]")
        os.utime(root / key, (old, old))
    real, calls = LocalObjectStore.delete, []

    def delete(self, key):
        calls.append(key)
        if len(calls) == 3:
            raise Killed
        real(self, key)

    monkeypatch.setattr(LocalObjectStore, "delete", delete)
    with caplog.at_level(logging.INFO, logger="dtm_ops.store.feature_store"), pytest.raises(Killed):
        store.gc()
    assert calls == keys
    assert [r.getMessage() for r in caplog.records] == [f"{root}: deleted {k} (3 bytes, unused)" for k in keys[:2]]
    assert [k for k in keys if (root / k).exists()] == keys[2:]


def test_a_folder_store_that_does_not_exist_yet_lists_nothing_not_its_parents_files(tmp_path):
    from dtm_ops.store.objects import LocalObjectStore

    (tmp_path / "beside.json").write_text("{}")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.json").write_text("{}")
    store = LocalObjectStore(tmp_path / "later")
    assert list(store.list("")) == [] and list(store.list_partial("")) == [] and list(store.list("sub/")) == []
    store.put("a.json", b"1")
    assert list(store.list("")) == ["a.json"] and list(store.list("a")) == ["a.json"]


def test_gc_deletes_what_a_killed_local_writer_left_half_written(tmp_path):
    """A local write goes to a temporary name first (fileio.atomic_write); a writer killed in
    between leaves it behind, unseen by readers: gc deletes it once it is old."""
    import os
    import time

    from dtm_ops.store.feature_store import GC_GRACE_S

    root = tmp_path / "store"
    store = FeatureStore.open(root)
    store.append(FP, *_frames(2, prefix="a"))
    left = {f"shards/.0123456789abcdef0123.safetensors.{'5f' * 16}.tmp": 100,
            f"manifests/.v0000000002.json.gz.{'9e' * 16}.tmp": 10}
    old = time.time() - GC_GRACE_S - 60
    for key, size in left.items():
        (root / key).write_bytes(b"x" * size)
        os.utime(root / key, (old, old))
    young = f".latest.json.{'77' * 16}.tmp"
    (root / young).write_bytes(b"{}")  # a write in progress
    (root / "shards" / "notes.tmp").write_bytes(b"")  # not a name of atomic_write's: left alone
    os.utime(root / "shards" / "notes.tmp", (old, old))
    assert not any(k.endswith(".tmp") for k in store.objects.list())  # readers never see them
    report = store.gc()
    assert set(report.deleted) == set(left) and report.deleted_bytes == 110
    assert report.young == (young,) and (root / young).exists() and (root / "shards" / "notes.tmp").exists()
    assert not any((root / key).exists() for key in left)
    assert set(_all_frames(FeatureStore.open(root))) == {"a0", "a1"}


def test_the_temporary_names_gc_collects_are_those_atomic_write_uses(tmp_path, monkeypatch):
    from pathlib import Path

    from dtm_ops import fileio

    renamed = []
    replace = fileio.os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda src, dst: renamed.append(Path(src).name) or replace(src, dst))
    FeatureStore.open(tmp_path).objects.put("shards/x.safetensors", b"x")
    assert len(renamed) == 1 and fileio.is_temporary(renamed[0])
    assert not fileio.is_temporary("x.safetensors") and not fileio.is_temporary("notes.tmp")
