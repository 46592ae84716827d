"""Feature-store benchmark on a real S3 server (Ceph RGW on 127.0.0.1).

1. Read throughput: the streaming reader (parallel GETs, checksum, decode, in order) against
   raw ``get_object`` of the same shard bytes, one after the other, measured in one run.
2. The features of a run's hits (heat maps): a few frames as checked byte ranges against
   their shards read whole, side by side.
3. Compression: bytes per frame of fp32 / fp16 / int8 shards and of a PCA projection, and
   the error of DTM scores against fp32 features, on real features of demo frames.
4. Deletes, as ``dtm gc`` makes them: ``--deletes`` small objects removed one DELETE each
   against ``delete_many`` (one DeleteObjects request per 1000 keys), side by side.

Uses ``DTM_S3_ENDPOINT`` and AWS_* from the environment when set; otherwise starts a server
with scripts/s3-server.sh (Debian's Ceph packages).

    .venv/bin/python benchmarks/bench_store.py [--frames 512] [--repeat 3] [--parts read compression deletes]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from dtm_ops.features import FeatureExtractor
from dtm_ops.matching import patchwise_cosine
from dtm_ops.projection import Projection
from dtm_ops.store import FeatureStore, S3Config
from dtm_ops.store.feature_store import SHARDS
from dtm_ops.store.format import FrameEntry, decode_shard, encode_shard
from dtm_ops.store.objects import S3ObjectStore
from timing import best_of

REPO = Path(__file__).resolve().parents[1]


def server_config() -> tuple[S3Config, str | None]:
    """The S3 server of ``DTM_S3_ENDPOINT``, else a Ceph one started here (the caller stops
    it; one that fails to start is stopped here, so that no daemon is left to load the
    machine under later measurements)."""
    if os.environ.get("DTM_S3_ENDPOINT"):
        return S3Config.from_env(), None
    folder = tempfile.mkdtemp(prefix="dtm-s3-")
    script = str(REPO / "scripts/s3-server.sh")
    started = subprocess.run(["bash", script, "start", folder], capture_output=True, text=True)
    if started.returncode:
        subprocess.run(["bash", script, "stop", folder], capture_output=True)
        raise SystemExit(f"the S3 server did not start (exit {started.returncode}; logs in {folder}/log):\n"
                         f"{started.stderr[-2000:]}")
    env = dict(line.removeprefix("export ").split("=", 1) for line in Path(folder, "env").read_text().splitlines() if line)
    return S3Config.from_env(env), folder


def drop_bucket(cfg: S3Config, bucket: str) -> None:
    """Delete ``bucket`` and every object in it: a benchmark's data must not pile up on a
    server that outlives it (``DTM_S3_ENDPOINT``; a Ceph one started here keeps objects in
    memory, and a full one stalls writes)."""
    objects = S3ObjectStore(bucket, "", cfg)
    failed = objects.delete_many(list(objects.list()))
    if failed:
        raise SystemExit(f"could not empty bucket {bucket}: {failed}")
    objects.client.delete_bucket(Bucket=bucket)


def deletes(cfg: S3Config, n: int, repeat: int) -> None:
    """``n`` objects of 1 KiB deleted one by one, then as ``delete_many`` deletes them, in
    turns, ``repeat`` times each; the best run of each."""
    bucket = f"dtm-bench-delete-{os.getpid()}"
    cfg.client().create_bucket(Bucket=bucket)
    objects = S3ObjectStore(bucket, "features", cfg)
    keys = [f"shards/{k:05d}.safetensors" for k in range(n)]
    best = {"one DELETE per object": float("inf"), "delete_many": float("inf")}
    try:
        for _ in range(repeat):
            for how in best:
                for key in keys:
                    objects.put(key, b"x" * 1024)
                start = time.perf_counter()
                if how == "delete_many":
                    assert objects.delete_many(keys) == {}
                else:
                    for key in keys:
                        objects.delete(key)
                best[how] = min(best[how], time.perf_counter() - start)
                assert not list(objects.list("shards/"))
    finally:
        drop_bucket(cfg, bucket)
    one, many = best.values()
    print(f"deletes of {n} objects (best of {repeat}): one DELETE each {one:.2f} s ({n / one:.0f}/s), "
          f"delete_many {many:.2f} s ({n / many:.0f}/s): {one / many:.1f}x")


def real_features(n: int) -> tuple[FeatureExtractor, list[torch.Tensor], list]:
    """Features of ``n`` demo frames (bikes.mp4, repeated if needed), default extractor."""
    from dtm_ops.demo import demo_videos
    from dtm_ops.media import iter_video

    extractor = FeatureExtractor(device="cpu")
    frames = [im for _, im in iter_video(demo_videos()["bikes"], step=4)]
    ff = extractor.extract(frames)
    feats = [ff[i % len(ff)].features for i in range(n)]
    return extractor, feats, [ff[i % len(ff)] for i in range(n)]


def read_throughput(cfg: S3Config, extractor, feats, ffs, repeat: int) -> None:
    bucket = f"bench-{int(time.time())}"
    cfg.client().create_bucket(Bucket=bucket)
    try:
        _read_throughput(cfg, bucket, extractor, feats, ffs, repeat)
    finally:
        drop_bucket(cfg, bucket)


def _read_throughput(cfg: S3Config, bucket: str, extractor, feats, ffs, repeat: int) -> None:
    store = FeatureStore.open(f"s3://{bucket}/f", s3_config=cfg)
    entries = [
        FrameEntry(f"f{i}", f"/x/{i}.jpg", "s", i, ff.size[0], ff.size[1], ff.valid, ff.scale) for i, ff in enumerate(ffs)
    ]
    per_shard = 128
    for s in range(0, len(entries), per_shard):
        store.append(extractor.fingerprint, entries[s : s + per_shard], feats[s : s + per_shard])
    shards = store.manifest().shards
    total = sum(s.bytes for s in shards)
    client = cfg.client()

    def raw() -> None:
        for s in shards:
            client.get_object(Bucket=bucket, Key=f"f/{SHARDS}{s.name}")["Body"].read()

    reader = FeatureStore.open(f"s3://{bucket}/f", s3_config=cfg)
    reader.manifest()  # a scan task reads the manifest once, then streams its shards

    def streamed() -> None:
        for _ in reader.iter_shards(shards):
            pass

    t_raw = best_of(raw, repeat)
    t_stream = best_of(streamed, repeat)
    mb = total / 1e6
    print(f"\nread {len(shards)} shards, {mb:.0f} MB, {len(entries)} frames (best of {repeat})")
    print(f"  raw get_object, sequential : {mb / t_raw:8.1f} MB/s  {len(entries) / t_raw:8.0f} frames/s")
    print(f"  streaming reader (verified): {mb / t_stream:8.1f} MB/s  {len(entries) / t_stream:8.0f} frames/s")
    print(f"  ratio reader / raw         : {t_raw / t_stream:8.2f}")
    hit_frames(reader, entries, repeat)
    with tempfile.TemporaryDirectory(prefix="dtm-store-") as folder:  # the same shards in a local folder
        local = FeatureStore.open(folder)
        for s in range(0, len(entries), per_shard):
            local.append(extractor.fingerprint, entries[s : s + per_shard], feats[s : s + per_shard])
        hit_frames(local, entries, repeat)


def hit_frames(store: FeatureStore, entries: list, repeat: int, hits: int = 20) -> None:
    """The features of a run's hits, for their heat maps (``FeatureStore.frame_features``):
    a few frames spread over the shards, read as checked byte ranges against each shard
    read whole (``FRAME_READ_RATIO`` set out of reach), in one run; the same tensors."""
    from dtm_ops.store import feature_store

    ids = [entries[i].frame_id for i in range(0, len(entries), max(1, len(entries) // hits))][:hits]
    read = store.objects.read_into
    moved = [0]

    def counted(key, out, offset=0):
        moved[0] += len(out)
        read(key, out, offset)

    store.objects.read_into = counted
    ratio = feature_store.FRAME_READ_RATIO
    got, seconds, moved_mb = {}, {}, {}
    try:
        for mode, r in (("whole", 10**9), ("ranges", ratio)):
            feature_store.FRAME_READ_RATIO = r
            moved[0] = 0
            got[mode] = store.frame_features(ids)
            moved_mb[mode] = moved[0] / 1e6
            seconds[mode] = best_of(lambda: store.frame_features(ids), repeat)
    finally:
        feature_store.FRAME_READ_RATIO = ratio
        store.objects.read_into = read
    assert all(torch.equal(got["whole"][i][1], got["ranges"][i][1]) for i in ids)
    shards = len({s.name for s in store.manifest().shards if any(f.frame_id in ids for f in s.frames)})
    where = "S3" if store.objects.ranged_reads else "a local folder"
    print(f"\nfeatures of {len(ids)} hits' frames in {shards} shards, {where} "
          f"(heat maps; best of {repeat}; the same tensors)")
    for mode in ("whole", "ranges"):
        print(f"  {'shards read whole' if mode == 'whole' else 'frames as byte ranges':<26}: "
              f"{seconds[mode] * 1e3:8.1f} ms  {moved_mb[mode]:8.1f} MB read")
    print(f"  ratio whole / ranges      : {seconds['whole'] / seconds['ranges']:8.2f}x time, "
          f"{moved_mb['whole'] / moved_mb['ranges']:.0f}x bytes")


def compression(extractor, feats, ffs) -> None:
    n = min(64, len(feats))
    x = torch.stack(feats[:n])  # fp32
    valid = torch.tensor([ffs[i].valid for i in range(n)], dtype=torch.int32)
    c = x.shape[1]
    g = torch.Generator().manual_seed(0)
    temps = []
    for i in range(8):  # templates cut from real frames
        f = feats[(i * 7) % n]
        r, q = int(torch.randint(0, f.shape[1] - 3, (1,), generator=g)), int(torch.randint(0, f.shape[2] - 4, (1,), generator=g))
        temps.append(f[:, r : r + 3, q : q + 4].clone())
    ref = patchwise_cosine(x, temps, valid)

    def err(maps) -> str:
        d = torch.cat([(a[torch.isfinite(b)] - b[torch.isfinite(b)]).abs() for a, b in zip(maps, ref)])
        best = max(abs(a.amax(dim=(1, 2)) - b.amax(dim=(1, 2))).max().item() for a, b in zip(maps, ref))
        return f"{d.max().item():>10.4f} {d.mean().item():>10.4f} {best:>12.4f}"

    print(f"\ncompression on {n} real frames ({c} channels, grid {tuple(x.shape[2:])}), 8 real templates")
    print(f"  {'setting':<22} {'bytes/frame':>12} {'max |err|':>10} {'mean |err|':>10} {'frame score':>12}")
    print(f"  {'':<22} {'':>12} {'(all positions, vs fp32 features)':>34}")
    for dtype in ("float32", "float16", "int8"):
        data = encode_shard(x, valid, dtype)
        entry = _entry(data, n, x.shape[2:])
        y, _ = decode_shard(torch.frombuffer(bytearray(data), dtype=torch.uint8), entry, source="bench")
        print(f"  {dtype:<22} {len(data) / n:>12.0f} {err(patchwise_cosine(y.float(), temps, valid))}")
    positions = torch.cat([x[i, :, :r, :q].reshape(c, -1).T for i, (r, q) in enumerate(_valid_rc(valid))])
    for dim in (64, 32):
        proj = Projection.fit(positions[:: max(1, len(positions) // 20000)], dim)
        px, pt = proj(x), [proj(t[None])[0] for t in temps]
        for i, (r, q) in enumerate(_valid_rc(valid)):
            px[i, :, r:, :] = 0
            px[i, :, :, q:] = 0
        data = encode_shard(px, valid, "float16")
        maps = patchwise_cosine(px.to(torch.float16).float(), pt, valid)
        print(f"  PCA {dim} + float16{'':<7} {len(data) / n:>12.0f} {err(maps)}")


def _valid_rc(valid):
    return [(int(a), int(b)) for a, b in valid]


def _entry(data: bytes, n: int, grid):
    import hashlib

    from dtm_ops.store.format import ShardEntry, crc64nvme

    frames = tuple(FrameEntry(f"f{i}", "", "", i, 0, 0, (0, 0), 1.0) for i in range(n))
    return ShardEntry("bench", hashlib.sha256(data).hexdigest(), len(data), tuple(grid), frames, crc64nvme(data))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--deletes", type=int, default=2000)
    ap.add_argument("--parts", nargs="+", choices=["read", "compression", "deletes"],
                    default=["read", "compression", "deletes"])
    a = ap.parse_args()
    cfg, folder = server_config()
    try:
        if {"read", "compression"} & set(a.parts):
            extractor, feats, ffs = real_features(a.frames)
        if "read" in a.parts:
            read_throughput(cfg, extractor, feats, ffs, a.repeat)
        if "compression" in a.parts:
            compression(extractor, feats, ffs)
        if "deletes" in a.parts:
            deletes(cfg, a.deletes, a.repeat)
    finally:
        if folder:
            subprocess.run(["bash", str(REPO / "scripts/s3-server.sh"), "stop", folder], capture_output=True)


if __name__ == "__main__":
    main()
