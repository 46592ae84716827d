"""Inference-time rewrites of a backbone that keep its function: fewer, cheaper layers.

- **Batch norm folded into the convolution before it.** In eval mode a ``BatchNorm2d`` is
  a per-channel affine map, so ``bn(conv(x))`` is one convolution with scaled weights and
  a bias: one pass over the activations instead of two.
- **"Same" padding done by the convolution.** TensorFlow-style dynamic padding
  (``efficientnet_lite_pytorch.utils.Conv2dDynamicSamePadding``) pads with ``F.pad``, a
  zero-filled copy of the whole input, on every call. At stride 1 the padding is
  ``(k - 1) * dilation`` for any input size, split evenly when that is even, so
  ``nn.Conv2d(padding=...)`` does the same without the copy. Strided ones pad
  asymmetrically and keep their own padding.
- **Clamping activations in place** (``ReLU6``, ``ReLU``) where they follow a
  convolution whose output nothing else reads.

Each rewrite changes results only by floating-point rounding (the tests compare the
rewritten network with the original, :mod:`tests.test_backbones`). On this project's
2-core CPU they made EfficientNet-Lite0 about 2-3x faster (``benchmarks/bench_extract.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn


def static_padding(conv: "nn.Conv2d") -> "nn.Conv2d":
    """``conv`` with its dynamic "same" padding replaced by the built-in one, where that is
    the same for every input size (stride 1, even total padding); else ``conv`` itself."""
    from torch import nn

    if type(conv) is nn.Conv2d or not isinstance(conv, nn.Conv2d) or any(p != 0 for p in conv.padding):
        return conv
    (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
    if tuple(conv.stride) != (1, 1) or (kh - 1) * dh % 2 or (kw - 1) * dw % 2 or conv.padding_mode != "zeros":
        return conv
    out = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=1,
                    padding=((kh - 1) * dh // 2, (kw - 1) * dw // 2), dilation=conv.dilation,
                    groups=conv.groups, bias=conv.bias is not None,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    out.load_state_dict(conv.state_dict())
    return out.train(conv.training)


def fold(module: "nn.Module", conv_name: str, bn_name: str) -> None:
    """Fold ``module.<bn_name>`` (eval mode) into ``module.<conv_name>``; the batch norm
    becomes an ``nn.Identity``. Works on attributes and on ``nn.Sequential`` indices."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    conv, bn = getattr(module, conv_name), getattr(module, bn_name)
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d) or bn.training:
        raise ValueError(f"cannot fold {bn_name} ({type(bn).__name__}) into {conv_name} ({type(conv).__name__})")
    setattr(module, conv_name, fuse_conv_bn_eval(static_padding(conv), bn))
    setattr(module, bn_name, nn.Identity())


def fold_sequential(seq: "nn.Sequential") -> None:
    """Fold every batch norm that directly follows a convolution in ``seq``."""
    from torch import nn

    for i in range(len(seq) - 1):
        if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
            fold(seq, str(i), str(i + 1))


def clamp_in_place(module: "nn.Module") -> None:
    """Make every ``ReLU`` / ``ReLU6`` under ``module`` work in place. Only for networks
    where each such activation's input is a fresh tensor that nothing else reads."""
    from torch import nn

    for m in module.modules():
        if isinstance(m, (nn.ReLU, nn.ReLU6)):
            m.inplace = True
