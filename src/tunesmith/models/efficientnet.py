"""EfficientNet-Lite0 loading the packaged ImageNet weights (DESIGN §12); the network itself is in
tunesmith.models.efficientnet_net (torch alone, so that exports can ship it).

The packaged state dict uses the names of the EfficientNet-PyTorch port (`_conv_stem`, a flat
`_blocks.i`, `_fc`); `convert_state_dict` maps them onto this module's names, where the blocks are
grouped in `stages` so that whole stages can be frozen.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.models.efficientnet_net import (
    BN_EPS,
    BN_MOMENTUM,
    FEATURE_DIM,
    LITE0_STAGES,
    EfficientNetLite0,
    MBConv,
    SamePadConv2d,
)

__all__ = [
    "BN_EPS",
    "BN_MOMENTUM",
    "FEATURE_DIM",
    "LITE0_STAGES",
    "EfficientNetLite0",
    "MBConv",
    "SamePadConv2d",
    "convert_state_dict",
    "load_efficientnet_lite0",
    "new_classifier",
    "preprocess",
]

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
