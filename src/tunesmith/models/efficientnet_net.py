"""EfficientNet-Lite0's network in plain torch: nothing but torch, so that an export can ship this
file as it is (tunesmith.exports.hf copies it beside `modeling_tunesmith.py`). Loading the packaged
weights, preprocessing and the rest live in tunesmith.models.efficientnet.

EfficientNet (Tan & Le, 2019, https://arxiv.org/abs/1905.11946) in its "Lite" form for mobile
accelerators: no squeeze-excitation, ReLU6 instead of swish, stem and head not rescaled
(https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BN_EPS", "BN_MOMENTUM", "FEATURE_DIM", "LITE0_STAGES", "EfficientNetLite0", "MBConv", "SamePadConv2d"]

# (expand ratio, kernel, stride of the first block, in channels, out channels, blocks), read off
# the packaged weights: 16 blocks in 7 stages.
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
)
STEM_CHANNELS = 32
FEATURE_DIM = 1280
# The weights come from TensorFlow: BN epsilon 1e-3 (torch's default 1e-5 changes the answer,
# some running variances are 0) and decay 0.99, which is torch momentum 0.01.
BN_EPS = 1e-3
BN_MOMENTUM = 0.01


def _bn(channels: int) -> nn.BatchNorm2d:
    """BatchNorm with the TensorFlow epsilon and momentum the weights were trained with."""
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class SamePadConv2d(nn.Conv2d):
    """A bias-free conv with TensorFlow "SAME" padding: output size ceil(input / stride).

    For stride 2 TF pads more on the bottom/right than on the top/left; a symmetric `k // 2`
    padding shifts the sampling grid by one pixel and the ported weights see shifted inputs.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: Any = 0,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        **kwargs: Any,
    ) -> None:
        # nn.Conv2d's signature, so that code building "a conv like this one" (peft's LoRA) can;
        # `padding` is ignored: the padding is computed from each input's size.
        super().__init__(
            in_channels, out_channels, kernel_size, stride=stride, dilation=dilation, groups=groups, bias=bias, **kwargs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_h = _same_pad(x.shape[-2], self.kernel_size[0], self.stride[0])
        pad_w = _same_pad(x.shape[-1], self.kernel_size[1], self.stride[1])
        if pad_h or pad_w:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return super().forward(x)


def _same_pad(size: int, kernel: int, stride: int) -> int:
    """Total padding TF "SAME" adds along one axis of length `size`."""
    out = -(-size // stride)
    return max((out - 1) * stride + kernel - size, 0)


class MBConv(nn.Module):
    """Inverted residual block: expand 1x1, depthwise kxk, project 1x1; residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        self.expand_conv: nn.Module | None = None
        self.expand_bn: nn.Module | None = None
        if expand != 1:
            self.expand_conv = SamePadConv2d(in_channels, hidden, 1)
            self.expand_bn = _bn(hidden)
        self.depthwise_conv = SamePadConv2d(hidden, hidden, kernel, stride=stride, groups=hidden)
        self.depthwise_bn = _bn(hidden)
        self.project_conv = SamePadConv2d(hidden, out_channels, 1)
        self.project_bn = _bn(out_channels)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand_conv is not None and self.expand_bn is not None:
            h = F.relu6(self.expand_bn(self.expand_conv(h)))  # (B, C*e, H, W)
        h = F.relu6(self.depthwise_bn(self.depthwise_conv(h)))  # (B, C*e, H/s, W/s)
        h = self.project_bn(self.project_conv(h))  # (B, C_out, H/s, W/s): linear bottleneck
        return x + h if self.residual else h


def _stage(expand: int, kernel: int, stride: int, in_ch: int, out_ch: int, blocks: int) -> nn.Sequential:
    """One stage: `blocks` MBConv blocks, the first one striding and changing the width."""
    return nn.Sequential(
        *(MBConv(in_ch if i == 0 else out_ch, out_ch, expand, kernel, stride if i == 0 else 1) for i in range(blocks))
    )


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0: stem, 7 stages of MBConv blocks, 1x1 head conv to 1280, pool, linear.

    `features(x)` gives the pooled (B, 1280) features, `forward(x)` the logits; `stages` holds the
    block stages (for partial freezing) and `classifier` the final linear layer.
    """

    # Its pre-trained weights fine-tune (full, partial) at this many times a transformer's default rate
    # with AdamW: 5e-5 x 20 = 1e-3. Measured on the packaged digits (README, "Learning rates").
    pretrained_lr_scale = 20.0

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        self.stem_conv = SamePadConv2d(3, STEM_CHANNELS, 3, stride=2)
        self.stem_bn = _bn(STEM_CHANNELS)
        self.stages = nn.ModuleList(_stage(*spec) for spec in LITE0_STAGES)
        self.head_conv = SamePadConv2d(LITE0_STAGES[-1][4], FEATURE_DIM, 1)
        self.head_bn = _bn(FEATURE_DIM)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, 1280) of images (B, 3, H, W) scaled as `preprocess` does."""
        h = F.relu6(self.stem_bn(self.stem_conv(x)))  # (B, 32, H/2, W/2)
        for stage in self.stages:
            h = stage(h)  # (B, 320, H/32, W/32) after the last
        h = F.relu6(self.head_bn(self.head_conv(h)))  # (B, 1280, H/32, W/32)
        return h.mean(dim=(2, 3))  # (B, 1280)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes)."""
        return self.classifier(self.dropout(self.features(x)))
