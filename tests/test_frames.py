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

from dtm_ops.errors import InputError, UnreadableFrame
from dtm_ops.media import EncodedImage, FrameRef, LazyImage, decoded, list_frames, load_frames, map_frames


def _digest(image: LazyImage | Image.Image) -> tuple:
    """What a frame holds; frames come to map_frames' function not decoded yet."""
    image = decoded(image)
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
    with pytest.raises(InputError, match="record bikes/009999: field 'frame': video ended before frame 9999"):
        for ref, _ in map_frames(refs, _digest, workers=2, ahead=2):
            seen.append(ref)
    assert seen == mixed[:3]


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, bikes_path) -> dict[str, FrameRef]:
    """Frames whose content cannot be had, one of each kind: bytes that are no image, a
    JPEG cut short, a file deleted since it was listed, frames of a file that is no video,
    and a frame past a video's end."""
    import io

    folder = tmp_path_factory.mktemp("damaged")
    (folder / "junk.jpg").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 30, 30)).save(buf, format="JPEG")
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "junk.mp4").write_bytes(b"\x00" * 4096)
    refs = {
        "junk": FrameRef("d/junk", str(folder / "junk.jpg"), "d", 0),
        "cut": FrameRef("d/cut", str(folder / "cut.jpg"), "d", 1),
        "gone": FrameRef("d/gone", str(folder / "gone.jpg"), "d", 2),
        "novideo3": FrameRef("junk/000003", f"{folder / 'junk.mp4'}#frame=3", "junk", 3),
        "novideo5": FrameRef("junk/000005", f"{folder / 'junk.mp4'}#frame=5", "junk", 5),
        "beyond": FrameRef("bikes/009999", f"{bikes_path}#frame=9999", "bikes", 9999),
    }
    return refs


@pytest.mark.parametrize("workers", [1, 3])
def test_with_on_unreadable_damaged_frames_are_told_in_order_and_the_rest_yielded(mixed, damaged, workers):
    """Against the same frames without the damaged ones: the same results in the same order."""
    d = damaged
    refs = ([d["junk"]] + mixed[:4] + [d["cut"], d["gone"]] + mixed[4:8] + [d["novideo3"], d["novideo5"]] + mixed[8:19]
            + [d["beyond"]] + mixed[19:])
    told = []
    got = list(map_frames(refs, _digest, workers=workers, ahead=4,
                          on_unreadable=lambda ref, exc: told.append((ref, exc))))
    assert got == list(map_frames(mixed, _digest, workers=workers, ahead=4))
    assert [ref for ref, _ in told] == [d[k] for k in ("junk", "cut", "gone", "novideo3", "novideo5", "beyond")]
    reasons = [exc.reason for _, exc in told]
    assert reasons[0] == "not a readable image (not an image, or of a format Pillow cannot read)"
    assert reasons[1].startswith("not a readable image (") and "truncated" in reasons[1]
    assert reasons[2] == "file not found"
    assert reasons[3] == reasons[4] and reasons[3].startswith("not a readable video (")
    assert reasons[5] == "video ended before frame 9999"
    assert [exc.record for _, exc in told] == [r.frame_id for r, _ in told]
    assert all(isinstance(exc, UnreadableFrame) for _, exc in told)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_storage_error_is_raised_even_with_on_unreadable(mixed, tmp_path, workers):
    """A frame that cannot be read for a reason a retry may cure (here a folder where a file
    should be: an OSError other than "not found") is no damaged frame: it stops the caller."""
    (tmp_path / "folder.jpg").mkdir()
    odd = FrameRef("odd/000001", str(tmp_path / "folder.jpg"), "odd", 1)
    told, seen = [], []
    with pytest.raises(InputError, match="record odd/000001: field 'image': cannot read") as err:
        for ref, _ in map_frames(mixed[:3] + [odd] + mixed[3:], _digest, workers=workers, ahead=2,
                                 on_unreadable=lambda ref, exc: told.append(ref)):
            seen.append(ref)
    assert not isinstance(err.value, UnreadableFrame) and told == [] and seen == mixed[:3]


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


@pytest.mark.parametrize("workers", [1, 3])
def test_indexing_leaves_damaged_frames_out_names_them_and_tries_them_again(mixed, damaged, tmp_path, random_extractor,
                                                                             workers, caplog):
    """One damaged file in a lake must not stop its batch on every run: the store holds
    exactly what indexing the readable frames alone writes, and the damaged ones are
    logged and listed, and met again by the next run."""
    import logging

    from dtm_ops.indexing import index_frames
    from dtm_ops.store import FeatureStore

    bad = [damaged["cut"], damaged["novideo3"]]
    refs = mixed[:5] + [bad[0]] + mixed[5:12] + [bad[1]] + mixed[12:]
    store, clean = FeatureStore.open(tmp_path / "with"), FeatureStore.open(tmp_path / "without")
    with caplog.at_level(logging.WARNING, logger="dtm_ops.indexing"):
        report = index_frames(refs, store, random_extractor, shard_frames=10, loader_workers=workers)
    index_frames(mixed, clean, random_extractor, shard_frames=10, loader_workers=workers)
    assert (report.added, report.skipped) == (len(mixed), 0)
    assert [(u["frame_id"], u["source"]) for u in report.unreadable] == [(r.frame_id, r.source) for r in bad]
    assert report.unreadable[1]["reason"].startswith("not a readable video (")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"left out unreadable frame {r.frame_id}"
                                                                       for r in bad]
    frames = [[f for s in st.manifest().shards for f in s.frames] for st in (store, clean)]
    assert frames[0] == frames[1]
    feats = [torch.cat([f for _, f, _ in st.iter_shards()]) for st in (store, clean)]
    assert torch.equal(*feats)
    again = index_frames(refs, FeatureStore.open(tmp_path / "with"), random_extractor, loader_workers=workers)
    assert (again.added, again.skipped, again.shards) == (0, len(mixed), 0) and again.unreadable == report.unreadable


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
    frames = [im for _, im in map_frames(refs, lambda im: im, workers=1)]  # as indexing reads them
    want = torch.stack([ff.features for ff in random_extractor.extract(frames)])
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


# ------------------------------------------------------------------ reduced decoding
def _photo(width: int, height: int, seed: int = 3) -> Image.Image:
    """Smooth shapes and some noise: a JPEG of it decodes like a camera frame."""
    from PIL import ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (width, height), (90, 120, 150))
    draw = ImageDraw.Draw(im)
    for _ in range(30):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(width // 30, width // 6))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    a = np.asarray(im.filter(ImageFilter.GaussianBlur(2)), dtype=np.int16) + rng.integers(-10, 11, (height, width, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("jpeg") / "000007.jpg"
    _photo(1925, 1083).save(path, quality=92)  # odd sizes: the reduced ones round up
    return str(path)


def test_a_jpeg_decodes_at_the_largest_reduction_still_large_enough(big_jpeg, tmp_path):
    """1/k of each side, rounded up, for the largest k of 1, 2, 4, 8 with k times the size
    asked for within the full size (sizes computed by hand); PNGs decode in full."""
    from dtm_ops.media import read_image

    enc = read_image(big_jpeg)
    assert isinstance(enc, EncodedImage) and enc.size == (1925, 1083)
    assert enc.decode().size == (1925, 1083)
    assert enc.decode((641, 361)).size == (963, 542)  # k=2
    assert enc.decode((962, 541)).size == (963, 542)  # 2 x 962 <= 1925: k=2
    assert enc.decode((963, 300)).size == (1925, 1083)  # 2 x 963 > 1925: k=1
    assert enc.decode((400, 200)).size == (482, 271)  # k=4
    assert enc.decode((100, 100)).size == (241, 136)  # k=8, the decoder's largest
    png = tmp_path / "a.png"
    Image.open(big_jpeg).save(png)
    assert read_image(png).decode((100, 100)).size == (1925, 1083)


def test_preprocess_decodes_a_jpeg_reduced_to_nearly_the_same_pixels(big_jpeg):
    """Same geometry as a full decode (sizes and scale of the full image); pixels within a
    few grey levels of the full decode's resize; with the option off, exactly those."""
    from dtm_ops.media import read_image
    from dtm_ops.preprocess import Preprocess

    full = Image.open(big_jpeg).convert("RGB")
    want = np.asarray(full.resize((640, 360), Image.Resampling.BILINEAR, reducing_gap=None)).astype(np.int16)
    reduced = Preprocess(long_side=640)(read_image(big_jpeg))
    exact = Preprocess(long_side=640, reduced_decode=False)(read_image(big_jpeg))
    for got in (reduced, exact):
        assert got.size == (640, 360) and got.scale == 640 / 1925 and got.pixels.shape == (3, 384, 640)
    assert (exact.pixels[:, :360].permute(1, 2, 0).numpy() == want).all()
    diff = np.abs(reduced.pixels[:, :360].permute(1, 2, 0).numpy().astype(np.int16) - want)
    assert 0 < diff.mean() < 2.0 and np.percentile(diff, 99) <= 12
    assert int(reduced.pixels[:, 360:].sum()) == 0


@pytest.mark.parametrize("index", [3, 150])
def test_a_video_frame_is_scaled_straight_to_the_size_asked_for(bikes_path, bikes_frames, index):
    """Where the size asked for halves the frame or more, FFmpeg's scaler makes exactly
    that size; its pixels are within a few grey levels of the full conversion resized by
    Pillow (a bias of about one: the full conversion rounds less accurately). Otherwise,
    and without a size, the frame is the full conversion itself (the fixture's decode)."""
    from dtm_ops.media import VideoFrameImage, read_image

    frame = read_image(f"{bikes_path}#frame={index}")
    assert isinstance(frame, VideoFrameImage) and frame.size == (640, 272)
    assert np.array_equal(np.asarray(frame.decode()), np.asarray(bikes_frames[index]))
    assert np.array_equal(np.asarray(frame.decode((321, 100))), np.asarray(bikes_frames[index]))  # 642 > 640
    for size in [(320, 136), (128, 54), (213, 91)]:
        got = np.asarray(frame.decode(size)).astype(np.int16)
        want = np.asarray(bikes_frames[index].resize(size, Image.Resampling.BILINEAR, reducing_gap=None))
        diff = got - want.astype(np.int16)
        assert got.shape == (size[1], size[0], 3)
        assert abs(diff.mean()) < 2.0 and np.percentile(np.abs(diff), 99) <= 6


def test_the_policy_before_reduced_decoding_keeps_its_fingerprint():
    """Feature sets indexed before the option recorded ``{long_side, multiple}`` only."""
    from dtm_ops.preprocess import Preprocess

    assert Preprocess(reduced_decode=False).to_dict() == {"long_side": 640, "multiple": 32}
    assert Preprocess().to_dict() == {"long_side": 640, "multiple": 32, "reduced_decode": True}


def test_indexing_decodes_jpegs_reduced_and_records_the_full_size(big_jpeg, random_extractor, tmp_path):
    """Stored features are those of the reduced decode (the same as the extractor gives
    for the not-yet-decoded file), not of a full decode; the entry keeps the full image's
    size and the scale from it. A store from before the option reopens with its policy."""
    import dataclasses

    from dtm_ops.indexing import extractor_for_store, index_frames
    from dtm_ops.media import read_image
    from dtm_ops.store import FeatureStore

    refs = list_frames(big_jpeg)
    store = FeatureStore.open(tmp_path / "store")
    index_frames(refs, store, random_extractor, dtype="float32")
    entry = store.manifest().shards[0].frames[0]
    assert (entry.width, entry.height) == (1925, 1083) and entry.scale == 128 / 1925
    stored = next(iter(store.iter_shards()))[1][0]
    assert torch.equal(stored, random_extractor.extract([read_image(big_jpeg)])[0].features)
    full = random_extractor.extract([Image.open(big_jpeg).convert("RGB")])[0].features
    assert not torch.equal(stored, full)
    assert extractor_for_store(store, weights="random", device="cpu").preprocess.reduced_decode

    old = dataclasses.replace(random_extractor.preprocess, reduced_decode=False)
    assert "reduced_decode" not in old.to_dict()
    random_extractor.preprocess, kept = old, random_extractor.preprocess
    try:
        index_frames(refs, FeatureStore.open(tmp_path / "old"), random_extractor, dtype="float32")
    finally:
        random_extractor.preprocess = kept
    reopened = extractor_for_store(FeatureStore.open(tmp_path / "old"), weights="random", device="cpu")
    assert not reopened.preprocess.reduced_decode


def test_a_jpeg_that_cannot_be_decoded_names_its_frame(big_jpeg, random_extractor, tmp_path):
    """A truncated file has a readable header: the error comes at decode time, on a loader
    thread, and still names the frame and the field."""
    data = open(big_jpeg, "rb").read()
    bad = tmp_path / "lake" / "000003.jpg"
    bad.parent.mkdir()
    bad.write_bytes(data[: len(data) // 3])
    (tmp_path / "lake" / "000001.jpg").write_bytes(data)
    refs = list_frames(tmp_path / "lake")
    with pytest.raises(InputError, match="not a readable image") as err:
        list(map_frames(refs, random_extractor.prepare_frame, workers=2))
    assert err.value.record == "000003" and err.value.field == "image" and str(bad) in str(err.value)
