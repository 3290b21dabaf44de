"""Frozen work on images done once (see training/cache.py for text).

Each distinct image is run through the frozen part once per run: items are keyed by a hash of
the image's content and of the preprocessing, so the same picture under two names (or in two
splits) is computed once, and a change of size or normalisation can never reuse stale values.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.data.images import content_key
from tunesmith.training.cache import allocate_store

__all__ = ["cache_image_features", "cache_image_states", "feature_keys"]


def feature_keys(items: Sequence[dict[str, Any]], preprocessing: Any) -> list[str]:
    """One key per item: sha256 of the image content and the preprocessing's description."""
    described = preprocessing.describe().encode()
    return [hashlib.sha256(content_key(it["image"]).encode() + described).hexdigest() for it in items]


def cache_image_features(
    model: Any,
    items: Sequence[dict[str, Any]],
    objective: Any,
    batch_size: int,
    autocast: Callable[[], Any],
    max_bytes: int,
    spill_dir: Path,
    name: str,
) -> list[dict[str, Any]]:
    """Items with the pooled backbone `features` (D,) in place of their image; labels kept."""

    def compute(pixels: torch.Tensor) -> torch.Tensor:
        return model.encode(pixels)  # type: ignore[no-any-return]

    values = _run_once(model, items, objective, batch_size, autocast, max_bytes, spill_dir / f"{name}.f32", compute)
    return [{"features": value, "label": it["label"]} for it, value in zip(items, values, strict=True)]


def cache_image_states(
    model: Any,
    items: Sequence[dict[str, Any]],
    objective: Any,
    batch_size: int,
    autocast: Callable[[], Any],
    max_bytes: int,
    spill_dir: Path,
    name: str,
    k: int,
) -> list[dict[str, Any]] | None:
    """Items with the feature map `hidden` (C, H, W) entering stage `k` in place of their image.

    Returns:
        None, with a warning, when the model cannot start at stage `k` or the split does not give
        its full forward's features: the caller trains uncached.
    """
    if not _split_matches(model, items, objective, k):
        return None

    def compute(pixels: torch.Tensor) -> torch.Tensor:
        return model.encode_prefix(pixels, k).flatten(1)  # type: ignore[no-any-return]  # (B, C*H*W)

    with torch.no_grad():
        probe = objective.collate([items[0]])["pixel_values"].to(_device(model))
        shape = model.encode_prefix(probe, k).shape[1:]  # (C, H, W)
    values = _run_once(model, items, objective, batch_size, autocast, max_bytes, spill_dir / f"{name}.f32", compute)
    return [
        {"hidden": value.view(shape), "label": it["label"], "start_block": k}
        for it, value in zip(items, values, strict=True)
    ]


@torch.no_grad()
def _run_once(model, items, objective, batch_size, autocast, max_bytes, spill_path, compute) -> list[torch.Tensor]:
    """`compute(pixels)` for each distinct image (eval mode, training precision), as one row per item
    of a float32 store (in memory, or memory-mapped at `spill_path` past `max_bytes`)."""
    keys = feature_keys(items, objective.preprocessing)
    row_of: dict[str, int] = {}
    firsts: list[int] = []  # the first item of each distinct key
    for i, key in enumerate(keys):
        if key not in row_of:
            row_of[key] = len(firsts)
            firsts.append(i)
    was_training = model.training
    model.eval()
    store: np.ndarray | None = None
    device = _device(model)
    try:
        for start in range(0, len(firsts), batch_size):
            ids = firsts[start : start + batch_size]
            pixels = objective.collate([items[i] for i in ids])["pixel_values"].to(device)
            with autocast():
                values = compute(pixels).float().cpu().numpy()  # (B, width)
            if store is None:
                store = allocate_store(len(firsts), values.shape[1], max_bytes, spill_path)
            store[start : start + len(ids)] = values
    finally:
        model.train(was_training)
    assert store is not None
    return [torch.from_numpy(store[row_of[key]]) for key in keys]


def _split_matches(model: Any, items: Sequence[dict[str, Any]], objective: Any, k: int) -> bool:
    """Whether stages k.. on the cached map give the full forward's features (fp32, two images)."""
    arch = type(getattr(model, "backbone", model)).__name__
    if not model.can_split(k):
        return _no_cache(f"{arch} cannot start at stage {k}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            pixels = objective.collate([items[0], items[-1]])["pixel_values"].to(_device(model))
            full = model.encode(pixels)
            split = model.encode_suffix(model.encode_prefix(pixels, k), k)
    finally:
        model.train(was_training)
    if not torch.allclose(split, full, rtol=1e-4, atol=1e-5):
        return _no_cache(
            f"{arch}: split at stage {k} differs from the full forward by {(split - full).abs().max():.2e}"
        )
    return True


def _no_cache(why: str) -> bool:
    warnings.warn(f"{why}; the frozen stages will run at every step instead of once", stacklevel=4)
    return False


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device
