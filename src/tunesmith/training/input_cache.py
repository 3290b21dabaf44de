"""Frozen work on fixed-size inputs (images, audio clips) done once; see training/cache.py for text.

Each distinct input is run through the frozen part once per run: items are keyed by the caller
(a hash of the content and of the preprocessing), so the same picture or clip under two names, or
in two splits, is computed once, and a change of size or normalisation never reuses stale values.

The caller's objective collates items into model inputs: one main input that the cache replaces
(`pixel_values`, `input_features`) and, optionally, side inputs kept per item (`frames`, how many
encoder positions hold a clip). The model provides `encode(**inputs)` (pooled features),
`can_split(k)`, `encode_prefix(k=k, **inputs)` (the states entering block or stage `k`), and a
forward that accepts `features=` or `hidden=..., start_block=k` with the side inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.training.cache import allocate_store, warn_uncached

__all__ = ["cache_input_features", "cache_input_states"]

Collate = Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]


def cache_input_features(
    model: Any,
    items: Sequence[dict[str, Any]],
    keys: Sequence[str],
    collate: Collate,
    batch_size: int,
    autocast: Callable[[], Any],
    max_bytes: int,
    spill_dir: Path,
    name: str,
) -> list[dict[str, Any]]:
    """Items with the pooled `features` (D,) in place of their input; labels kept.

    Args:
        keys: one per item; items with equal keys are computed once.
        collate: the objective's collate (its batch minus `labels` is the model's input).
    """

    def compute(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.encode(**inputs)  # type: ignore[no-any-return]

    path = spill_dir / f"{name}.f32"
    values = _run_once(model, items, keys, collate, batch_size, autocast, max_bytes, path, compute)
    return [{"features": value, "label": it["label"]} for it, value in zip(items, values, strict=True)]


def cache_input_states(
    model: Any,
    items: Sequence[dict[str, Any]],
    keys: Sequence[str],
    collate: Collate,
    main: str,
    batch_size: int,
    autocast: Callable[[], Any],
    max_bytes: int,
    spill_dir: Path,
    name: str,
    k: int,
) -> list[dict[str, Any]] | None:
    """Items with `hidden`, the states entering block `k`, in place of their input `main`; labels and
    side inputs (one value per item, such as `frames`) kept.

    Returns:
        None, with a warning, when the model cannot start at block `k` or the split does not give
        its full forward's output: the caller trains uncached.
    """
    if not _split_matches(model, items, collate, main, k):
        return None

    def compute(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.encode_prefix(k=k, **inputs).flatten(1)  # type: ignore[no-any-return]

    with torch.no_grad():
        probe = _inputs(collate([items[0]]), model)
        shape = model.encode_prefix(k=k, **probe).shape[1:]
    path = spill_dir / f"{name}.f32"
    values = _run_once(model, items, keys, collate, batch_size, autocast, max_bytes, path, compute)
    cached = []
    for it, value in zip(items, values, strict=True):
        side = {key: v[0] for key, v in collate([it]).items() if key not in (main, "labels")}
        cached.append({"hidden": value.view(shape), "label": it["label"], "start_block": k, **side})
    return cached


@torch.no_grad()
def _run_once(model, items, keys, collate, batch_size, autocast, max_bytes, spill_path, compute) -> list[torch.Tensor]:
    """`compute(inputs)` for each distinct key (eval mode, training precision), as one row per item of
    a float32 store (in memory, or memory-mapped at `spill_path` past `max_bytes`)."""
    row_of: dict[str, int] = {}
    firsts: list[int] = []  # the first item of each distinct key
    for i, key in enumerate(keys):
        if key not in row_of:
            row_of[key] = len(firsts)
            firsts.append(i)
    was_training = model.training
    model.eval()
    store: np.ndarray | None = None
    try:
        for start in range(0, len(firsts), batch_size):
            ids = firsts[start : start + batch_size]
            inputs = _inputs(collate([items[i] for i in ids]), model)
            with autocast():
                values = compute(inputs).float().cpu().numpy()  # (B, width)
            if store is None:
                store = allocate_store(len(firsts), values.shape[1], max_bytes, spill_path)
            store[start : start + len(ids)] = values
    finally:
        model.train(was_training)
    assert store is not None
    return [torch.from_numpy(store[row_of[key]]) for key in keys]


def _split_matches(model: Any, items: Sequence[dict[str, Any]], collate: Collate, main: str, k: int) -> bool:
    """Whether blocks k.. on the cached states give the full forward's logits (fp32, two inputs)."""
    arch = type(getattr(model, "backbone", model)).__name__
    if not model.can_split(k):
        return warn_uncached(f"{arch} cannot start at block {k}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = _inputs(collate([items[0], items[-1]]), model)
            full = model(**inputs)
            side = {key: v for key, v in inputs.items() if key != main}
            split = model(hidden=model.encode_prefix(k=k, **inputs), start_block=k, **side)
    finally:
        model.train(was_training)
    if not torch.allclose(split, full, rtol=1e-4, atol=1e-5):
        gap = (split - full).abs().max()
        return warn_uncached(f"{arch}: split at block {k} differs from the full forward by {gap:.2e}")
    return True


def _inputs(batch: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items() if key != "labels"}
