"""Frozen work on images done once: the fixed-size input cache (training/input_cache.py) keyed by
each image's content and the preprocessing, so the same picture under two names (or in two splits)
is computed once, and a change of size or normalisation can never reuse stale values."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunesmith.data.images import content_key
from tunesmith.training.input_cache import cache_input_features, cache_input_states

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
    keys = feature_keys(items, objective.preprocessing)
    return cache_input_features(model, items, keys, objective.collate, batch_size, autocast, max_bytes, spill_dir, name)


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
    """Items with the feature map `hidden` (C, H, W) entering stage `k` in place of their image, or
    None (with a warning) where the model cannot start at stage `k`: the caller trains uncached."""
    keys = feature_keys(items, objective.preprocessing)
    args = (batch_size, autocast, max_bytes, spill_dir, name, k)
    return cache_input_states(model, items, keys, objective.collate, "pixel_values", *args)
