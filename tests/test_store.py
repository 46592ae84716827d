"""Local feature store: round trip, idempotent append, and every integrity failure."""

from __future__ import annotations

import json

import pytest
import torch

from dtm_ops.errors import FeatureStoreError, FingerprintMismatch
from dtm_ops.fingerprint import Fingerprint
from dtm_ops.store.format import FrameEntry
from dtm_ops.store.local import LocalFeatureStore

FP = Fingerprint(backbone="b", weights="w" * 64, layer="l", stride=16, channels=4, preprocess={"long_side": 64})


def _frames(n: int, grid=(3, 5), prefix="f"):
    entries = [FrameEntry(f"{prefix}{i}", f"/x/{prefix}{i}.jpg", "seq", i, 80, 48, grid, 1.0) for i in range(n)]
    feats = [torch.nn.functional.normalize(torch.randn(4, *grid), dim=0) for _ in range(n)]
    return entries, feats


def test_round_trip_groups_by_grid_and_skips_known_frames(tmp_path):
    store = LocalFeatureStore(tmp_path)
    e1, f1 = _frames(3, (3, 5), "a")
    e2, f2 = _frames(2, (4, 4), "b")
    new = store.append(FP, e1 + e2, f1 + f2)
    assert sorted(s.grid for s in new) == [(3, 5), (4, 4)]
    assert store.append(FP, e1, f1) == []  # nothing new
    got = {}
    for entry, feats, valid in store.iter_shards():
        for k, fr in enumerate(entry.frames):
            got[fr.frame_id] = (feats[k], valid[k])
    assert set(got) == {"a0", "a1", "a2", "b0", "b1"}
    torch.testing.assert_close(got["a1"][0].float(), f1[1], atol=1e-3, rtol=0)  # fp16 storage
    assert got["b0"][1].tolist() == [4, 4]
    assert not list(tmp_path.rglob("*.tmp"))


def test_corrupted_shard_is_named(tmp_path):
    store = LocalFeatureStore(tmp_path)
    store.append(FP, *_frames(2))
    shard = next((tmp_path / "shards").iterdir())
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(FeatureStoreError, match=f"shard {shard.name}: checksum mismatch"):
        list(store.iter_shards())


def test_missing_shard_and_unknown_version(tmp_path):
    store = LocalFeatureStore(tmp_path)
    store.append(FP, *_frames(2))
    shard = next((tmp_path / "shards").iterdir())
    shard.unlink()
    with pytest.raises(FeatureStoreError, match=f"shard {shard.name} named by the manifest is missing"):
        list(store.iter_shards())
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FeatureStoreError, match="unknown feature-store format version 99"):
        store.manifest()


def test_nan_features_are_refused_naming_the_frame(tmp_path):
    entries, feats = _frames(3)
    feats[2][1, 0, 0] = float("nan")
    with pytest.raises(FeatureStoreError, match="frame 'f2': field 'features' holds NaN"):
        LocalFeatureStore(tmp_path).append(FP, entries, feats)
    assert not (tmp_path / "manifest.json").exists()


def test_other_fingerprint_is_refused(tmp_path):
    store = LocalFeatureStore(tmp_path)
    store.append(FP, *_frames(1))
    other = Fingerprint(backbone="b", weights="w" * 64, layer="other", stride=16, channels=4, preprocess={"long_side": 64})
    with pytest.raises(FingerprintMismatch, match="layer"):
        store.append(other, *_frames(1, prefix="z"))


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FeatureStoreError, match="run 'dtm extract' first"):
        LocalFeatureStore(tmp_path / "nope").manifest()
