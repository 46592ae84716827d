"""map_frames (dtm_ops.media): frames read, decoded and transformed on worker threads, ahead
of the caller, against load_frames one frame after another: the same frames in the same
order, errors where their frame would have been, a bounded look-ahead, no thread left."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dtm_ops.errors import InputError
from dtm_ops.media import FrameRef, list_frames, load_frames, map_frames


def _digest(image: Image.Image) -> tuple:
    a = np.asarray(image)
    return image.size, int(a.astype(np.int64).sum()), a[::37, ::53].tobytes()


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, bikes_path, bikes_frames) -> list[FrameRef]:
    """Image files, then frames of bikes.mp4 (not all of them, not from the start), then
    more image files: both kinds of read, and a video between images."""
    folder = tmp_path_factory.mktemp("frames")
    for i in range(12):
        bikes_frames[i * 20].save(folder / f"a{i:03d}.png")  # lossless: decoded exactly
    images = list_frames(folder)
    video = [r for r in list_frames(bikes_path) if r.index % 7 == 3 and r.index > 40][:15]
    return images[:6] + video + images[6:]


def test_the_frames_asked_for_in_the_order_asked(mixed, bikes_frames):
    """Against frames decoded independently (the fixture's whole-video decode; the PNGs
    were written from it losslessly), and against load_frames."""
    def expected(ref):
        index = ref.index * 20 if ref.source.endswith(".png") else ref.index  # a001.png holds frame 20
        return _digest(bikes_frames[index])

    got = list(map_frames(mixed, _digest, workers=3, ahead=4))
    assert [r for r, _ in got] == mixed
    assert [d for _, d in got] == [expected(r) for r in mixed]
    assert got == [(ref, _digest(im)) for ref, im in load_frames(mixed)]


def test_an_unreadable_frame_raises_where_it_would_have_been(mixed, tmp_path):
    missing = FrameRef("gone/000001", str(tmp_path / "gone.png"), "gone", 1)
    refs = mixed[:8] + [missing] + mixed[8:]
    seen = []
    with pytest.raises(InputError, match="gone/000001") as err:
        for ref, _ in map_frames(refs, _digest, workers=3, ahead=4):
            seen.append(ref)
    assert seen == mixed[:8]  # everything before it, nothing after it
    assert "file not found" in str(err.value)


def test_a_video_that_ends_early_raises_in_order(mixed, bikes_path):
    beyond = FrameRef("bikes/009999", f"{bikes_path}#frame=9999", "bikes", 9999)
    refs = mixed[:3] + [beyond]
    seen = []
    with pytest.raises(InputError, match="video ended before frames"):
        for ref, _ in map_frames(refs, _digest, workers=2, ahead=2):
            seen.append(ref)
    assert seen == mixed[:3]


def test_work_runs_on_several_threads(mixed):
    lock = threading.Lock()
    running = {"now": 0, "most": 0}

    def slow(image):
        with lock:
            running["now"] += 1
            running["most"] = max(running["most"], running["now"])
        time.sleep(0.05)
        with lock:
            running["now"] -= 1
        return image.size

    assert len(list(map_frames(mixed, slow, workers=3, ahead=8))) == len(mixed)
    assert 2 <= running["most"] <= 3


def test_at_most_ahead_frames_are_read_ahead_of_a_slow_caller(mixed):
    lock = threading.Lock()
    count = {"started": 0, "consumed": 0, "most_ahead": 0}

    def fast(image):
        with lock:
            count["started"] += 1
            count["most_ahead"] = max(count["most_ahead"], count["started"] - count["consumed"])
        return image.size

    for _ in map_frames(mixed, fast, workers=3, ahead=5):
        time.sleep(0.02)  # the network, slower than reading
        with lock:
            count["consumed"] += 1
    # a slot is freed just before a frame is handed over, so one more may start before the
    # caller counts it; the look-ahead fills up to the bound and not beyond
    assert 5 <= count["most_ahead"] <= 6, count


def test_stopping_early_stops_the_threads(mixed):
    before = set(threading.enumerate())
    frames = map_frames(mixed, _digest, workers=3, ahead=4)
    for k, _ in enumerate(frames):
        if k == 2:
            break
    frames.close()
    left = [t for t in set(threading.enumerate()) - before if t.name.startswith("dtm-frames")]
    assert not left, left


def test_indexing_with_loading_ahead_writes_what_loading_before_each_batch_writes(mixed, tmp_path, random_extractor):
    """The GPU default (loader threads) against the CPU default, on the CPU."""
    from dtm_ops.indexing import index_frames
    from dtm_ops.store import FeatureStore

    stores = {}
    for workers in (1, 3):
        stores[workers] = FeatureStore.open(tmp_path / f"w{workers}")
        index_frames(mixed, stores[workers], random_extractor, shard_frames=10, loader_workers=workers)
    frames = {w: [f for s in st.manifest().shards for f in s.frames] for w, st in stores.items()}
    feats = {w: torch.cat([f for _, f, _ in st.iter_shards()]) for w, st in stores.items()}
    assert [f.frame_id for f in frames[1]] == [r.frame_id for r in mixed]
    assert frames[3] == frames[1]
    assert torch.equal(feats[3], feats[1])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_indexing_stores_the_float32_features_cast_to_the_store_dtype(mixed, tmp_path, random_extractor, dtype):
    """The extractor casts to float16 before its copy to the host (half the bytes off a GPU);
    the store must still hold exactly the float32 features cast to its dtype on the host."""
    from dtm_ops.indexing import index_frames
    from dtm_ops.store import FeatureStore

    refs = mixed[4:12]  # images and video frames
    store = FeatureStore.open(tmp_path / dtype)
    index_frames(refs, store, random_extractor, dtype=dtype)
    stored = torch.cat([f for _, f, _ in store.iter_shards()])
    want = torch.stack([ff.features for ff in random_extractor.extract([im for _, im in load_frames(refs)])])
    assert want.dtype == torch.float32 and stored.dtype == getattr(torch, dtype)
    assert torch.equal(stored, want.to(stored.dtype))


@pytest.mark.parametrize("size,scale", [((50, 30), None), ((64, 64), 0.5)])
def test_preprocess_keeps_the_resized_bytes_and_pads_with_zeros(size, scale):
    """Prepared pixels are the resized image's own RGB bytes (uint8), zero past it."""
    from dtm_ops.preprocess import Preprocess

    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(1, 256, (size[1], size[0], 3), dtype=np.uint8))
    got = Preprocess(long_side=40, multiple=32)(image, scale)
    w, h = got.size
    want = np.asarray(image.resize((w, h), Image.Resampling.BILINEAR, reducing_gap=None))
    assert got.pixels.dtype == torch.uint8 and got.pixels.shape == (3, 32, 64 if size == (50, 30) else 32)
    assert (got.pixels[:, :h, :w].permute(1, 2, 0).numpy() == want).all()
    assert int(got.pixels[:, h:, :].sum()) == 0 and int(got.pixels[:, :, w:].sum()) == 0
