"""Reading frames: image files, and frames of videos addressed as ``path#frame=N``.

A *frame source* is a string: an image path or ``s3://bucket/key`` URI, or
``VIDEO#frame=N`` for the 0-based frame ``N`` of a local video file. Frame ids are stable
names used in results and stores. S3 is reached with the default S3 settings
(:func:`dtm_ops.store.objects.default_s3_config`).

Loaders hand frames on before they become RGB images (:class:`LazyImage`: a file's bytes,
or a video frame in the codec's pixel format), so that whoever prepares the pixels decodes
them at the size it needs (:mod:`dtm_ops.preprocess`); :func:`open_image` and
:func:`load_frames` decode in full.
"""

from __future__ import annotations

import abc
import functools
import operator
import os
import queue
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from PIL import Image, UnidentifiedImageError

from dtm_ops.errors import InputError, UnreadableFrame

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"}
_FRAME_RE = re.compile(r"^(?P<path>.+)#frame=(?P<index>\d+)$")
T = TypeVar("T")


@dataclass(frozen=True)
class FrameRef:
    """Where a frame comes from.

    Attributes:
        frame_id: stable id (``<sequence>/<index:06d>`` for video frames, the image's path
            relative to the scanned folder without extension for images).
        source: an image path or ``VIDEO#frame=N``.
        sequence: video or folder the frame belongs to (near-duplicate grouping).
        index: frame index within the sequence (video) or position in sorted order.
    """

    frame_id: str
    source: str
    sequence: str
    index: int


def _s3(uri: str):
    """``s3://bucket/key`` -> (object store of the bucket, key)."""
    from dtm_ops.store.objects import default_s3_config

    bucket, _, key = uri[5:].partition("/")
    return _bucket(bucket, default_s3_config()), key


@functools.lru_cache(maxsize=16)
def _bucket(bucket: str, config):
    """One store (so one boto3 client, thread-safe) per bucket and S3 settings: a client
    costs tens of milliseconds to create, more than reading a frame."""
    from dtm_ops.store.objects import S3ObjectStore

    return S3ObjectStore(bucket, "", config)


class LazyImage(abc.ABC):
    """A frame not converted to a PIL image yet: its full ``size`` is known, and
    :meth:`decode` makes the image, in full or, where the caller will shrink it to
    ``at_least`` by half or more, at a reduced size for less work. The reduced decode is
    asked for by :class:`dtm_ops.preprocess.Preprocess` where its policy allows, so it runs
    where the pixels are prepared: on indexing's loader threads."""

    size: tuple[int, int]

    @abc.abstractmethod
    def decode(self, at_least: tuple[int, int] | None = None) -> Image.Image:
        """The frame as an RGB image: in full, or reduced where ``at_least`` allows."""


class EncodedImage(LazyImage):
    """An image file's bytes, decoded when asked: in full, or (a JPEG) by the decoder at a
    reduced size.

    A JPEG decoder can scale by 1/2, 1/4 or 1/8 inside its inverse DCT, at a fraction of a
    full decode's cost (a 1080p frame going to a 640-pixel long side: 6.7 ms against 14.8
    ms on this project's CPU, decode and resize).

    Attributes:
        size: ``(width, height)`` of the full image, from the file's header.
        source, record, field: named in the :class:`InputError` of a file that cannot be
            decoded.
    """

    def __init__(self, data: bytes, source: str, *, record: object = None, field: str = "image") -> None:
        import io

        self.data, self.source, self.record, self.field = data, source, record, field
        try:
            with Image.open(io.BytesIO(data)) as im:  # the header only
                self.size: tuple[int, int] = im.size
        except (UnidentifiedImageError, OSError) as exc:
            raise self._error(exc) from None

    def decode(self, at_least: tuple[int, int] | None = None) -> Image.Image:
        """The image as RGB. ``at_least``: ``(width, height)`` the caller needs; a JPEG is
        then decoded at ``ceil(size / k)`` for the largest ``k`` of 2, 4, 8 with ``k``
        times ``at_least`` within the full size (Pillow's ``draft``), else in full, as are
        other formats."""
        import io

        try:
            with Image.open(io.BytesIO(self.data)) as im:
                if at_least is not None and im.format == "JPEG":
                    im.draft("RGB", at_least)
                im.load()
                return im if im.mode == "RGB" else im.convert("RGB")  # convert would copy an RGB image
        except (UnidentifiedImageError, OSError) as exc:
            raise self._error(exc) from None

    def _error(self, exc: Exception) -> InputError:
        detail = "not an image, or of a format Pillow cannot read" if isinstance(exc, UnidentifiedImageError) else exc
        return UnreadableFrame(f"not a readable image ({detail})", source=self.source, record=self.record,
                               field=self.field)


#: FFmpeg's scaler flags for a reduced video frame: bilinear (its filter widens with the
#: reduction, as Pillow's does); bit-exact and accurately rounded, so the pixels do not
#: depend on the CPU's SIMD path; chroma interpolated at full width (against a full
#: conversion and Pillow's resize, 99th percentile of the difference 5 grey levels instead
#: of 14, for 10% more time).
VIDEO_SCALING = ("BILINEAR", "ACCURATE_RND", "BITEXACT", "FULL_CHR_H_INT")


class VideoFrameImage(LazyImage):
    """A decoded video frame in the codec's pixel format (YUV), converted to RGB when asked:
    in full, or straight to the size asked for by FFmpeg's scaler (bilinear) where that
    at least halves it, rather than converting every pixel and then shrinking (a 1080p
    H.264 frame going to 640x360: 5.3 ms against 20.2 ms on this project's CPU). The
    conversion releases the GIL, so loader threads share it.

    Attributes:
        frame: the ``av.VideoFrame``.
        source, record: named in the :class:`InputError` of a frame that cannot be converted.
    """

    def __init__(self, frame, source: str, *, record: object = None, field: str = "image") -> None:
        self.frame, self.source, self.record, self.field = frame, source, record, field
        self.size = (frame.width, frame.height)

    def decode(self, at_least: tuple[int, int] | None = None) -> Image.Image:
        """The frame as RGB: in full, or exactly ``at_least`` where that is at most half of
        each side (the JPEG rule of :meth:`EncodedImage.decode`)."""
        import av
        from av.video.reformatter import Interpolation

        w, h = self.size
        try:
            if at_least is not None and 2 * at_least[0] <= w and 2 * at_least[1] <= h:
                flags = functools.reduce(operator.or_, (Interpolation[f] for f in VIDEO_SCALING))
                return self.frame.to_image(width=at_least[0], height=at_least[1], interpolation=flags)
            return self.frame.to_image()
        except av.error.FFmpegError as exc:
            raise UnreadableFrame(f"video frame cannot be converted ({exc})", source=self.source, record=self.record,
                                  field=self.field) from None


def read_image(path: str | os.PathLike, *, record: object = None, field: str = "image") -> LazyImage:
    """A frame source's image, not converted to RGB yet: an image file (path or ``s3://``
    URI) as :class:`EncodedImage`, a video frame (``VIDEO#frame=N``) as
    :class:`VideoFrameImage`."""
    text = str(path)
    m = _FRAME_RE.match(text)
    if m:
        return _video_frame(m["path"], int(m["index"]), record=record, field=field)
    if text.startswith("s3://"):
        from dtm_ops.errors import FeatureStoreError
        from dtm_ops.store.objects import ObjectNotFound

        objects, key = _s3(text)
        try:
            data = objects.get(key)
        except ObjectNotFound:
            raise UnreadableFrame("file not found", source=text, record=record, field=field) from None
        except FeatureStoreError as exc:
            raise InputError(f"cannot read ({exc})", source=text, record=record, field=field) from None
    else:
        try:
            data = Path(text).read_bytes()
        except FileNotFoundError:
            raise UnreadableFrame("file not found", source=text, record=record, field=field) from None
        except OSError as exc:
            raise InputError(f"cannot read ({exc})", source=text, record=record, field=field) from None
    return EncodedImage(data, text, record=record, field=field)


def decoded(image: LazyImage | Image.Image) -> Image.Image:
    """``image`` as a PIL image, in full."""
    return image.decode() if isinstance(image, LazyImage) else image


def open_image(path: str | os.PathLike, *, record: object = None, field: str = "image") -> Image.Image:
    """Open an image (path or ``s3://`` URI) or a ``VIDEO#frame=N`` source as RGB, in
    full, with a clear error if it cannot be read."""
    return decoded(read_image(path, record=record, field=field))


def read_video_frame(path: str, index: int, *, record: object = None, field: str = "image") -> Image.Image:
    """Decode frame ``index`` (0-based) of a video."""
    return _video_frame(path, index, record=record, field=field).decode()


def _video_frame(path: str, index: int, *, record: object = None, field: str = "image") -> VideoFrameImage:
    """Frame ``index`` of a video, not converted to RGB (nor are the frames before it)."""
    for i, frame in _video_frames(path, record=record, field=field):
        if i == index:
            return VideoFrameImage(frame, path, record=record, field=field)
        if i > index:
            break
    raise UnreadableFrame(f"video has no frame {index}", source=path, record=record, field=field)


def iter_video(
    path: str, *, step: int = 1, record: object = None, field: str = "video"
) -> Iterator[tuple[int, Image.Image]]:
    """Yield ``(index, RGB image)`` for every ``step``-th frame of a video."""
    for i, frame in _video_frames(path, step=step, record=record, field=field):
        yield i, frame.to_image()


def _video_frames(
    path: str, *, step: int = 1, record: object = None, field: str = "video"
) -> Iterator[tuple[int, object]]:
    """:func:`iter_video`'s frames as ``av.VideoFrame`` (in the codec's pixel format)."""
    import av

    if not os.path.exists(path):
        raise UnreadableFrame("file not found", source=path, record=record, field=field)
    try:
        container = av.open(path)
    except av.error.FFmpegError as exc:
        raise UnreadableFrame(f"not a readable video ({exc})", source=path, record=record, field=field) from None
    with container:
        if not container.streams.video:
            raise UnreadableFrame("file has no video stream", source=path, record=record, field=field)
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i % step == 0:
                    yield i, frame
        except av.error.FFmpegError as exc:
            raise UnreadableFrame(f"video cannot be decoded ({exc})", source=path, record=record, field=field) from None


def is_video(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTS


def list_frames(source: str | os.PathLike, *, step: int = 1) -> list[FrameRef]:
    """Frames of a folder of images (recursively, sorted), an ``s3://`` prefix of images, or
    a video file.

    Video frames are counted by demuxing, so a damaged file fails here, before indexing.
    """
    if str(source).startswith("s3://"):
        return _list_s3_frames(str(source), step)
    path = Path(source)
    if not path.exists():
        raise InputError("file or folder not found", source=str(source), field="source")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
        if not files:
            raise InputError("folder holds no images", source=str(source), field="source")
        return [
            _image_ref(p.relative_to(path), str(p), path.name, i * step) for i, p in enumerate(files[::step])
        ]
    if path.suffix.lower() in IMAGE_EXTS:
        return [FrameRef(frame_id=path.stem, source=str(path), sequence=path.stem, index=0)]
    if is_video(path):
        import av

        try:
            with av.open(str(path)) as c:
                n = sum(1 for _ in c.demux(c.streams.video[0]) if _.size)
        except (av.error.FFmpegError, IndexError) as exc:
            raise InputError(f"not a readable video ({exc})", source=str(path), field="source") from None
        seq = path.stem
        return [
            FrameRef(frame_id=f"{seq}/{i:06d}", source=f"{path}#frame={i}", sequence=seq, index=i)
            for i in range(0, n, step)
        ]
    raise InputError(
        f"unsupported file type {path.suffix!r} (images: {sorted(IMAGE_EXTS)}, videos: {sorted(VIDEO_EXTS)})",
        source=str(source),
        field="source",
    )


def _list_s3_frames(uri: str, step: int) -> list[FrameRef]:
    objects, prefix = _s3(uri.rstrip("/") + "/")
    keys = sorted(k for k in objects.list(prefix) if Path(k).suffix.lower() in IMAGE_EXTS)
    if not keys:
        raise InputError("prefix holds no images", source=uri, field="source")
    top = Path(prefix.rstrip("/")).name
    return [
        _image_ref(Path(key[len(prefix) :]), f"s3://{objects.bucket}/{key}", top, i * step)
        for i, key in enumerate(keys[::step])
    ]


def _image_ref(rel: Path, source: str, top: str, position: int) -> FrameRef:
    """A frame that is an image file at ``rel`` below the scanned folder or prefix ``top``:
    its id is ``rel`` without extension, its sequence the folder holding it, and its index
    the trailing digits of its name (frame files named by their index keep it), else
    its position."""
    stem = rel.with_suffix("")
    seq = stem.parent.as_posix() if stem.parent != Path(".") else top
    digits = re.search(r"(\d+)$", stem.name)
    return FrameRef(frame_id=stem.as_posix(), source=source, sequence=seq, index=int(digits.group(1)) if digits else position)


def load_frames(
    refs: list[FrameRef], on_unreadable: Callable[[FrameRef, UnreadableFrame], None] | None = None
) -> Iterator[tuple[FrameRef, Image.Image]]:
    """Decode frames in order, in full, reading each video once rather than once per frame
    (``on_unreadable``: as :func:`map_frames` takes it)."""
    return _one_by_one(refs, decoded, on_unreadable)


def _one_by_one(refs: list[FrameRef], fn: Callable[[LazyImage], T], on_unreadable) -> Iterator[tuple[FrameRef, T]]:
    for ref, read in _frame_reads(refs):
        result = _unless_unreadable(ref, lambda: fn(read()), on_unreadable)
        if result is not _SKIPPED:
            yield ref, result


_SKIPPED = object()


def _unless_unreadable(ref: FrameRef, get: Callable[[], T], on_unreadable) -> T | object:
    """``get()``; where it raises :class:`UnreadableFrame` and there is an ``on_unreadable``,
    that is told and ``_SKIPPED`` returned."""
    try:
        return get()
    except UnreadableFrame as exc:
        if on_unreadable is None:
            raise
        on_unreadable(ref, exc)
        return _SKIPPED


def map_frames(
    refs: list[FrameRef],
    fn: Callable[[LazyImage], T],
    *,
    workers: int = 4,
    ahead: int = 16,
    on_unreadable: Callable[[FrameRef, UnreadableFrame], None] | None = None,
) -> Iterator[tuple[FrameRef, T]]:
    """``(ref, fn(image))`` for each frame, in the order of ``refs``, computed ahead of the
    caller: frames are passed to ``fn`` as :class:`LazyImage` (``fn`` converts them, at
    the size it needs) on ``workers`` threads, at most ``ahead`` frames ahead. Image files
    are read there; a video is decoded one frame after another, by FFmpeg's own threads,
    on a reader thread that hands each frame to the workers.

    A frame that cannot be read raises its :class:`InputError` where that frame would
    have been yielded; frames after it are not yielded. With ``on_unreadable``, a frame
    whose content cannot be had (:class:`UnreadableFrame`: a damaged image or video, a
    file deleted since it was listed) is passed to it, in its turn, and skipped instead.
    Stopping early stops the threads.
    """
    if workers <= 1:
        yield from _one_by_one(refs, fn, on_unreadable)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="dtm-frames")
    slots = threading.Semaphore(max(1, ahead))
    done = threading.Event()
    order: queue.Queue = queue.Queue()  # (ref, future), then None; or (None, the reader's error)

    def reader() -> None:
        try:
            with closing(_frame_reads(refs)) as reads:  # closing: a video open when stopped early
                for ref, read in reads:  # video frames are decoded here, images in `read`
                    slots.acquire()
                    if done.is_set():  # the caller stopped
                        return
                    order.put((ref, pool.submit(lambda r=read: fn(r()))))
            order.put(None)
        except BaseException as exc:  # noqa: BLE001 - raised in the caller's thread, in order
            order.put((None, exc))

    thread = threading.Thread(target=reader, name="dtm-frames-reader", daemon=True)
    thread.start()
    try:
        while (item := order.get()) is not None:
            ref, fut = item
            if ref is None:
                raise fut
            result = _unless_unreadable(ref, fut.result, on_unreadable)
            slots.release()
            if result is not _SKIPPED:
                yield ref, result
    finally:
        done.set()
        slots.release()  # wakes the reader if it waits for a slot
        thread.join()
        pool.shutdown(wait=True, cancel_futures=True)


def _frame_reads(refs: list[FrameRef]) -> Iterator[tuple[FrameRef, Callable[[], LazyImage]]]:
    """``(ref, read)`` in order: ``read()`` returns the frame, not converted to RGB yet.
    Image files are read when ``read`` is called (:func:`read_image`); each video is
    decoded once, in order, by this generator (:class:`VideoFrameImage`)."""
    i = 0
    while i < len(refs):
        m = _FRAME_RE.match(refs[i].source)
        if not m:
            ref = refs[i]
            yield ref, functools.partial(read_image, ref.source, record=ref.frame_id)
            i += 1
            continue
        video = m["path"]
        wanted: dict[int, FrameRef] = {}
        j = i
        while j < len(refs):
            mj = _FRAME_RE.match(refs[j].source)
            if not mj or mj["path"] != video:
                break
            wanted[int(mj["index"])] = refs[j]
            j += 1
        last = max(wanted)
        try:
            for idx, frame in _video_frames(video, record=refs[i].frame_id):
                if idx in wanted:
                    ref = wanted.pop(idx)
                    image = VideoFrameImage(frame, video, record=ref.frame_id)
                    yield ref, lambda image=image: image
                if idx >= last:
                    break
            reason = None
        except UnreadableFrame as exc:  # the frames it did not reach fail with it, each in its turn
            reason = exc.reason
        for idx, ref in wanted.items():
            error = UnreadableFrame(reason or f"video ended before frame {idx}", source=video, record=ref.frame_id,
                                    field="frame")
            yield ref, functools.partial(_fail, error)
        i = j


def _fail(error: Exception):
    raise error
