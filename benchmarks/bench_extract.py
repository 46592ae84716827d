"""Feature extraction throughput on CUDA: batched, channels-last, fp16 autocast, inference
mode (what :class:`dtm_ops.features.FeatureExtractor` does on a GPU), on 1080p frames.

Random weights (speed does not depend on them). Pixels start in pinned host memory; the
time covers the copy, normalisation, the backbone and the per-cell normalisation, and the
features' copy back to the host, as in indexing.

    python benchmarks/bench_extract.py [--batch 32] [--repeat 3]
"""

from __future__ import annotations

import argparse

import torch

from dtm_ops.features import FeatureExtractor
from timing import best_of


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    H, W = 1088, 1920  # 1080p padded to a multiple of 32
    pixels = torch.randint(0, 256, (a.batch, 3, H, W), dtype=torch.uint8).float().pin_memory()
    sizes = [(1920, 1080)] * a.batch
    print(f"\n{torch.cuda.get_device_name()}: extraction of {a.batch} frames of 1920x1080 per batch")
    for backbone, layer in (("efficientnet_lite0", "block_s16"), ("resnet50", "layer3")):
        ex = FeatureExtractor(backbone, layer, long_side=1920, weights="random", device="cuda", batch_size=a.batch)
        # the warm-up lets cuDNN pick its kernels
        best = best_of(lambda: ex._forward(pixels, sizes, project=False), a.repeat, torch.cuda.synchronize,
                       warm_up=True)
        f = ex._forward(pixels[:1], sizes[:1], project=False)
        print(f"  {backbone}/{layer}: {a.batch / best:7.0f} frames/s, features {tuple(f.shape[1:])}")


if __name__ == "__main__":
    main()
