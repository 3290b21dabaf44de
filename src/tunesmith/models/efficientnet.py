"""EfficientNet-Lite0 in plain torch, loading the packaged ImageNet weights (DESIGN §12).

EfficientNet (Tan & Le, 2019, https://arxiv.org/abs/1905.11946) in its "Lite" form for mobile
accelerators: no squeeze-excitation, ReLU6 instead of swish, stem and head not rescaled
(https://github.com/tensorflow/tpu/tree/master/models/official/efficientnet/lite).

The packaged state dict uses the names of the EfficientNet-PyTorch port (`_conv_stem`, a flat
`_blocks.i`, `_fc`); `convert_state_dict` maps them onto this module's names, where the blocks are
grouped in `stages` so that whole stages can be frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.errors import ConfigError

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "LITE0_STAGES",
    "EfficientNetLite0",
    "convert_state_dict",
    "load_efficientnet_lite0",
    "new_classifier",
    "preprocess",
]

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
INPUT_MEAN = 127.0  # the weights' input scaling: (x - 127) / 128 on 0..255 pixels
INPUT_STD = 128.0

_BLOCK_NAMES = {
    "_expand_conv": "expand_conv",
    "_bn0": "expand_bn",
    "_depthwise_conv": "depthwise_conv",
    "_bn1": "depthwise_bn",
    "_project_conv": "project_conv",
    "_bn2": "project_bn",
}
_TOP_NAMES = {"_conv_stem": "stem_conv", "_bn0": "stem_bn", "_conv_head": "head_conv", "_bn1": "head_bn"}


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


def convert_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a state dict of the EfficientNet-PyTorch port (the packaged file) to this module's names.

    Raises:
        ConfigError: a key that neither naming scheme knows (not an EfficientNet-Lite0 state dict).
    """
    starts = [0]
    for *_, blocks in LITE0_STAGES:
        starts.append(starts[-1] + blocks)
    converted: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) == 4 and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
            index = int(parts[1])
            stage = max(s for s, start in enumerate(starts[:-1]) if start <= index)
            new = f"stages.{stage}.{index - starts[stage]}.{_BLOCK_NAMES[parts[2]]}.{parts[3]}"
        elif parts[0] in _TOP_NAMES and len(parts) == 2:
            new = f"{_TOP_NAMES[parts[0]]}.{parts[1]}"
        elif parts[0] == "_fc" and len(parts) == 2:
            new = f"classifier.{parts[1]}"
        else:
            raise ConfigError(
                f"unexpected key {key!r} in an EfficientNet-Lite0 state dict (EfficientNet-PyTorch names)"
            )
        converted[new] = value
    return converted


def new_classifier(num_classes: int, seed: int = 0) -> nn.Linear:
    """A fresh linear head over the 1280 features, initialised from `seed` (normal std 0.01, zero bias).

    Uses its own generator, so the global RNG is left alone and the same seed gives the same head.
    """
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    head = nn.utils.skip_init(nn.Linear, FEATURE_DIM, num_classes)  # no default init: no global RNG draw
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.normal_(head.weight, std=0.01, generator=generator)
        nn.init.zeros_(head.bias)
    return head


def load_efficientnet_lite0(num_classes: int | None = None, seed: int = 0) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the packaged ImageNet weights, loaded strictly.

    Args:
        num_classes: classes of the task; None or 1000 keeps the ImageNet classifier, anything else
            replaces it with a new head seeded by `seed`.
        seed: seed of the new head.

    Raises:
        ConfigError: the carrier package is not installed, or its file is not a Lite0 state dict.
    """
    from tunesmith.zoo import PACKAGED_MODELS, carrier_path  # lazy: zoo is the packaged-file lookup

    path = carrier_path(PACKAGED_MODELS["efficientnet-lite0"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = EfficientNetLite0()
    try:
        model.load_state_dict(convert_state_dict(state), strict=True)
    except RuntimeError as error:
        raise ConfigError(f"{path} does not match EfficientNet-Lite0: {error}") from error
    if num_classes is not None and num_classes != model.classifier.out_features:
        model.classifier = new_classifier(num_classes, seed)
    return model


def preprocess(image: Any, size: int = 224) -> torch.Tensor:
    """An image as the (3, size, size) float tensor the weights expect.

    Resizes the shorter side to 256 * size / 224 (bilinear), crops the centre `size` x `size`, and
    scales pixels to (x - 127) / 128. Grayscale and RGBA images become RGB.

    Args:
        image: a PIL image, or a uint8 array (H, W) or (H, W, 3|4).
        size: side of the output.

    Raises:
        ConfigError: `image` is neither a PIL image nor a uint8 array of a supported shape.
    """
    from PIL import Image  # lazy: only image tasks need pillow

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise ConfigError(f"image array must be uint8 (H, W) or (H, W, 1|3|4), got {image.dtype} {image.shape}")
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image)
    if not isinstance(image, Image.Image):
        raise ConfigError(f"preprocess takes a PIL image or a uint8 array, got {type(image).__name__}")
    image = image.convert("RGB")
    short = round(256 * size / 224)
    width, height = image.size
    scale = short / min(width, height)
    resized = image.resize(
        (max(size, round(width * scale)), max(size, round(height * scale))), Image.Resampling.BILINEAR
    )
    left = (resized.width - size) // 2
    top = (resized.height - size) // 2
    crop = resized.crop((left, top, left + size, top + size))
    pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32).copy())  # (size, size, 3)
    return ((pixels - INPUT_MEAN) / INPUT_STD).permute(2, 0, 1).contiguous()  # (3, size, size)
