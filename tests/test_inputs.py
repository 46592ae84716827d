"""Bad input anywhere gives an error naming the file, the record and the field."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from dtm_ops import backbones
from dtm_ops.errors import FingerprintMismatch, InputError, WeightsError
from dtm_ops.features import FeatureExtractor
from dtm_ops.indexing import index_frames
from dtm_ops.media import list_frames, open_image
from dtm_ops.queries import read_queries
from dtm_ops.search import Query, Searcher
from dtm_ops.store import FeatureStore


@pytest.fixture
def lake(tmp_path):
    folder = tmp_path / "lake" / "cam1"
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (96, 64), (40 * i, 80, 120)).save(folder / f"{i * 10:06d}.jpg")
    return tmp_path / "lake"


def test_missing_and_unreadable_images(tmp_path):
    with pytest.raises(InputError, match="file not found") as err:
        open_image(tmp_path / "nope.jpg", record="q1", field="image")
    assert "nope.jpg" in str(err.value) and "q1" in str(err.value)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="not a readable image"):
        open_image(bad)


def test_bad_video_and_missing_frame(tmp_path, bikes_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="not a readable video"):
        list_frames(bad)
    with pytest.raises(InputError, match="video has no frame 9999"):
        open_image(f"{bikes_path}#frame=9999", record="q", field="image")


def test_folder_frames_keep_their_index_and_sequence(lake):
    refs = list_frames(lake)
    assert [(r.frame_id, r.sequence, r.index) for r in refs] == [
        (f"cam1/{i * 10:06d}", "cam1", i * 10) for i in range(4)
    ]
    notes = lake.parent / "notes.txt"
    notes.write_text("hi")
    with pytest.raises(InputError, match="unsupported file type"):
        list_frames(notes)


@pytest.mark.parametrize(
    "line,match,field",
    [
        ("{not json", "not valid JSON", None),
        ('{"boxes": [[0,0,5,5]]}', "missing", "image"),
        ('{"image": "a.jpg", "boxes": []}', "non-empty list", "boxes"),
        ('{"image": "a.jpg", "boxes": [[0,0,5]]}', r"expected \[x1, y1, x2, y2\]", "boxes[0]"),
        ('{"image": "a.jpg", "boxes": [[0,0,5,5]], "mode": "most"}', "mode must be", "mode"),
        ('{"image": "a.jpg", "boxes": [[0,0,5,5]], "labels": ["a", "b"]}', "2 labels for 1 boxes", "labels"),
    ],
)
def test_query_file_errors_name_line_and_field(tmp_path, line, match, field):
    path = tmp_path / "q.jsonl"
    path.write_text('{"image": "ok.jpg", "boxes": [[0, 0, 5, 5]]}\n' + line + "\n")
    with pytest.raises(InputError, match=match) as err:
        read_queries(path)
    assert "q.jsonl" in str(err.value) and "line 2" in str(err.value)
    if field:
        assert f"'{field}'" in str(err.value)


def test_query_paths_resolve_against_the_query_file(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "image": "img.jpg", "boxes": [[0, 0, 5, 5]]}) + "\n")
    assert read_queries(path)[0].source == str(tmp_path / "sub" / "img.jpg")


def test_search_rejects_box_outside_image_and_duplicate_ids(lake, tmp_path, random_extractor):
    store = FeatureStore.open(tmp_path / "features")
    index_frames(list_frames(lake), store, random_extractor)
    image = str(next(lake.rglob("*.jpg")))
    searcher = Searcher(random_extractor, top_k=2)
    with pytest.raises(InputError, match="outside the 96x64 image") as err:
        searcher.search(store, [Query("q7", image, [(0, 0, 10, 10), (50, 50, 200, 60)])])
    assert "q7" in str(err.value) and "'boxes[1]'" in str(err.value)
    with pytest.raises(InputError, match="duplicate query id"):
        searcher.search(store, [Query("a", image, [(0, 0, 10, 10)]), Query("a", image, [(0, 0, 10, 10)])])


def test_search_refuses_features_of_another_extractor(lake, tmp_path, random_extractor):
    store = FeatureStore.open(tmp_path / "features")
    index_frames(list_frames(lake), store, random_extractor)
    other = FeatureExtractor("efficientnet_lite0", "block_s8", long_side=128, weights="random", device="cpu")
    with pytest.raises(FingerprintMismatch, match="layer"):
        Searcher(other).search(store, [Query("q", str(next(lake.rglob("*.jpg"))), [(0, 0, 10, 10)])])


def test_reindexing_adds_nothing_and_new_frames_add_shards(lake, tmp_path, random_extractor):
    store = FeatureStore.open(tmp_path / "features")
    first = index_frames(list_frames(lake), store, random_extractor)
    again = index_frames(list_frames(lake), store, random_extractor)
    assert (first.added, again.added, again.skipped) == (4, 0, 4)
    Image.new("RGB", (96, 64)).save(lake / "cam1" / "000099.jpg")
    more = index_frames(list_frames(lake), store, random_extractor)
    assert (more.added, store.manifest().frame_count) == (1, 5)


def test_weights_are_never_silently_random(tmp_path):
    with pytest.raises(WeightsError, match="no weights file given"):
        backbones.build("resnet50", "layer3")
    with pytest.raises(WeightsError, match="weights file not found"):
        backbones.build("resnet50", "layer3", weights=str(tmp_path / "missing.pth"))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        backbones.build("efficientnet_lite0", "head", weights=str(junk))
    with pytest.raises(ValueError, match="has no layer"):
        backbones.build("efficientnet_lite0", "layer9")


def test_torchvision_backbone_loads_a_local_state_dict(tmp_path):
    import torch
    import torchvision

    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pth"
    torch.save(net.state_dict(), path)
    m = backbones.build("resnet18", "layer3", weights=str(path))
    assert m.weights_id == backbones.file_sha256(str(path))
    x = torch.rand(1, 3, 64, 96) * 255
    with torch.inference_mode():
        assert m(m.normalize(x)).shape == (1, 256, 4, 6)


def test_calibration_reads_a_bounded_number_of_shards(tmp_path, random_extractor):
    """Preparing queries samples calibration frames from at most CALIBRATION_SHARDS shards,
    however many the store holds (it must never read the whole lake)."""
    import torch

    from dtm_ops.search import CALIBRATION_SHARDS
    from dtm_ops.store.format import FrameEntry

    store = FeatureStore.open(tmp_path / "features")
    g = torch.Generator().manual_seed(0)
    for s in range(20):
        entries = [FrameEntry(f"s{s}f{i}", f"/x/{s}-{i}.jpg", "seq", s * 10 + i, 96, 64, (4, 6), 1.0) for i in range(2)]
        feats = [torch.nn.functional.normalize(torch.randn(random_extractor.channels, 4, 6, generator=g), dim=0) for _ in entries]
        store.append(random_extractor.fingerprint, entries, feats)
    read: list[str] = []
    read_into = store.objects.read_into

    def watched(key, out, offset=0):
        read.append(key)
        read_into(key, out, offset)

    store.objects.read_into = watched
    image = tmp_path / "q.jpg"
    Image.new("RGB", (96, 64), (90, 30, 200)).save(image)
    prepared = Searcher(random_extractor, calibration_frames=64).prepare([Query("q", str(image), [(10, 10, 50, 40)])], store)
    shards_read = {k for k in read if k.startswith("shards/")}
    assert 1 <= len(shards_read) <= CALIBRATION_SHARDS < 20
    assert all(t.sigma > 0 and t.mu != 0.0 for t in prepared[0].templates)  # calibrated from those frames


def test_calibration_sample_does_not_depend_on_the_order_shards_were_committed(tmp_path, random_extractor):
    """Indexing tasks commit shards in the order they finish. The same frames committed in
    another order must give the same calibration sample, hence the same mu and sigma, and
    the sample's shards are those at evenly spaced points of the frame ids' order."""
    import random

    import torch

    from dtm_ops.search import CALIBRATION_SHARDS
    from dtm_ops.store.format import FrameEntry

    g = torch.Generator().manual_seed(0)
    shards = []
    for s in range(20):  # shards of 1 to 4 frames: where the evenly spaced points fall depends on the order
        entries = [FrameEntry(f"cam/{s:03d}-{i}", f"/x/{s}-{i}.jpg", "cam", s * 10 + i, 96, 64, (4, 6), 1.0)
                   for i in range(1 + s % 4)]
        shards.append((entries, [torch.randn(random_extractor.channels, 4, 6, generator=g) for _ in entries]))
    image = tmp_path / "q.jpg"
    Image.new("RGB", (96, 64), (90, 30, 200)).save(image)
    query = Query("q", str(image), [(10, 10, 50, 40)])

    def prepare(order):
        store = FeatureStore.open(tmp_path / f"features-{'-'.join(map(str, order[:3]))}")
        for k in order:
            store.append(random_extractor.fingerprint, *shards[k])
        read: set[str] = set()
        read_into = store.objects.read_into

        def watched(key, out, offset=0):
            read.add(key)
            read_into(key, out, offset)

        store.objects.read_into = watched
        templates = Searcher(random_extractor, calibration_frames=16).prepare([query], store)[0].templates
        first_frame = {"shards/" + e.name: e.frames[0].frame_id for e in store.manifest().shards}
        return [(t.mu, t.sigma) for t in templates], sorted(first_frame[k] for k in read if k.startswith("shards/"))

    in_order = list(range(20))
    shuffled = in_order[:]
    random.Random(3).shuffle(shuffled)
    calibration, sampled = prepare(in_order)
    assert prepare(shuffled) == (calibration, sampled)
    assert prepare(in_order[::-1]) == (calibration, sampled)
    # by hand: frame counts 1,2,3,4,1,2,... (50 frames); points (j + 0.5) * 50 / 8 fall in these shards
    counts = [1 + s % 4 for s in range(20)]
    starts = [sum(counts[:s]) for s in range(20)]
    points = [(j + 0.5) * sum(counts) / CALIBRATION_SHARDS for j in range(CALIBRATION_SHARDS)]
    expected = sorted({max(s for s in range(20) if starts[s] <= p) for p in points})
    assert sampled == [f"cam/{s:03d}-0" for s in expected]
