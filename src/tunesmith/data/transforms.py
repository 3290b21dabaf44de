"""Image transforms as small pure functions on PIL images and tensors (no torchvision).

Evaluation is deterministic: resize the shorter side, crop the centre (or resize straight to the
square where the model's processor does that), scale the pixels. Training may add a random
resized crop and a horizontal flip (Krizhevsky et al. 2012; Szegedy et al. 2015), drawn from a
`random.Random` the caller seeds, so a run's augmentation is reproducible and resumes exactly.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "Preprocessing",
    "center_crop",
    "eval_transform",
    "hflip",
    "random_resized_crop",
    "resize_shorter",
    "to_tensor",
    "train_transform",
]


@dataclass(frozen=True)
class Preprocessing:
    """How a model wants its images.

    Attributes:
        size: side of the square input.
        resize: the shorter side is resized to this, then the centre `size` square is cropped;
            None resizes the whole image to `size` x `size` (ViT's processor does that).
        mean, std: per-channel normalisation in 0..255 pixel units: `(pixel - mean) / std`.
    """

    size: int
    resize: int | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def describe(self) -> str:
        """A stable description, part of the feature cache's key."""
        return f"size={self.size} resize={self.resize} mean={self.mean} std={self.std}"


def resize_shorter(image: Any, side: int) -> Any:
    """Resize (bilinear) so that the shorter side is `side`, keeping the aspect ratio."""
    from PIL import Image

    width, height = image.size
    scale = side / min(width, height)
    new = (max(side, round(width * scale)), max(side, round(height * scale)))
    return image if new == image.size else image.resize(new, Image.Resampling.BILINEAR)


def center_crop(image: Any, size: int) -> Any:
    """The centre `size` x `size` square (the image must be at least that large)."""
    left = (image.width - size) // 2
    top = (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


def random_resized_crop(
    image: Any, size: int, scale: tuple[float, float], ratio: tuple[float, float], rng: random.Random
) -> Any:
    """A crop covering a random share `scale` of the area with a random aspect ratio in `ratio`
    (log-uniform), resized to `size` x `size`; after 10 misses, the centre crop of the largest
    allowed ratio."""
    from PIL import Image

    width, height = image.size
    area = width * height
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
    aspect = width / height
    w, h = (
        (width, height)
        if ratio[0] <= aspect <= ratio[1]
        else ((round(height * ratio[1]), height) if aspect > ratio[1] else (width, round(width / ratio[0])))
    )
    left, top = (width - w) // 2, (height - h) // 2
    return image.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))


def hflip(image: Any) -> Any:
    from PIL import Image

    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def to_tensor(image: Any, pre: Preprocessing) -> torch.Tensor:
    """A PIL image (RGB or grayscale) as normalised floats (3, H, W); grayscale is repeated to 3 channels."""
    pixels = np.asarray(image, dtype=np.float32)  # (H, W) or (H, W, 3)
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[:, :, None], 3, axis=2)
    mean = np.asarray(pre.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(pre.std, dtype=np.float32)
    return torch.from_numpy(((pixels - mean) * inv_std).transpose(2, 0, 1).copy())  # (3, H, W)


def eval_transform(image: Any, pre: Preprocessing) -> torch.Tensor:
    """The deterministic input (3, size, size) of an image."""
    from PIL import Image

    if pre.resize is None:
        fitted = image.resize((pre.size, pre.size), Image.Resampling.BILINEAR)
    else:
        fitted = center_crop(resize_shorter(image, pre.resize), pre.size)
    return to_tensor(fitted, pre)


def train_transform(image: Any, pre: Preprocessing, augment: Any, rng: random.Random) -> torch.Tensor:
    """A randomly augmented input (3, size, size): random resized crop, then a coin-flip mirror.

    Args:
        augment: a `data.augment` section (crop_scale, crop_ratio, hflip).
        rng: the source of every random choice.
    """
    cropped = random_resized_crop(image, pre.size, augment.crop_scale, augment.crop_ratio, rng)
    if augment.hflip and rng.random() < 0.5:
        cropped = hflip(cropped)
    return to_tensor(cropped, pre)
