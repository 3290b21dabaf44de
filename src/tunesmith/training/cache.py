"""Frozen work done once: what runs before the first trainable weight runs a single time per run,
in eval mode, and its output replaces the token ids.

- `cache_features`: nothing before the head trains (feature extraction), so the pooled features
  (H,) of each example are cached and later epochs train the head alone.
- `cache_hidden`: the embeddings and blocks 0..k-1 are frozen (partial fine-tuning), so the token
  states (T_i, H) entering block k are cached and every step runs only blocks k.. and the head.

Cached values live in memory up to a size bound and spill to a memory-mapped file on disk past it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.eval.evaluate import eval_batches
from tunesmith.runtime import Runtime

__all__ = ["allocate_store", "cache_features", "cache_hidden", "cache_text_items", "warn_uncached"]

Collate = Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]]


@torch.no_grad()
def cache_features(
    model: Any,
    items: Sequence[dict[str, Any]],
    collate: Collate,
    batch_size: int,
    autocast: Callable[[], Any],
    max_bytes: int,
    spill_dir: Path,
    name: str,
) -> list[dict[str, Any]]:
    """Items with `features` (H,) in place of token ids; labels kept.

    Args:
        autocast: a context factory, so features are computed in the precision training uses.
        max_bytes: above this the features go to `spill_dir/<name>.f32` (memory-mapped).
    """
    was_training = model.training
    model.eval()
    lengths = [len(it["input_ids"]) for it in items]
    store: np.ndarray | None = None
    try:
        for batch_ids in eval_batches(lengths, batch_size):
            batch = _on_device(collate([items[i] for i in batch_ids]), model)
            with autocast():
                feats = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            feats = feats.float().cpu().numpy()  # (B, H)
            if store is None:
                store = allocate_store(len(items), feats.shape[1], max_bytes, spill_dir / f"{name}.f32")
            store[batch_ids] = feats
    finally:
        model.train(was_training)
    assert store is not None
    return [{"features": torch.from_numpy(store[i]), "label": it["label"]} for i, it in enumerate(items)]


@torch.no_grad()
def cache_hidden(
    model: Any,
    items: Sequence[dict[str, Any]],
    collate: Collate,
    batch_size: int,
    autocast: Callable[[], Any],
    max_bytes: int,
    spill_dir: Path,
    name: str,
    k: int,
) -> list[dict[str, Any]] | None:
    """Items with `hidden` (T_i, H), the token states entering block `k`, in place of token ids.

    Each example keeps its own length T_i (no padding is stored), so length-grouped batching still
    works; `start_block` tells the model where to resume and labels are kept.

    Args:
        autocast: a context factory, so states are computed in the precision training uses.
        max_bytes: above this the states go to `spill_dir/<name>.f32` (memory-mapped).

    Returns:
        None, with a warning, when the model cannot be split at block `k` (an architecture it does
        not know) or the split does not reproduce its full forward: the caller runs it uncached.
    """
    was_training = model.training
    model.eval()
    lengths = [len(it["input_ids"]) for it in items]
    offsets = np.cumsum([0, *lengths])  # example i is rows offsets[i]:offsets[i + 1] of the store
    store: np.ndarray | None = None
    try:
        for batch_ids in eval_batches(lengths, batch_size):
            batch = _on_device(collate([items[i] for i in batch_ids]), model)
            if store is None and not _split_matches(model, batch, k):
                return None
            with autocast():
                hidden = model.encode_prefix(
                    batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), k
                )
            hidden = hidden.float().cpu().numpy()  # (B, T, H)
            if store is None:
                store = allocate_store(int(offsets[-1]), hidden.shape[2], max_bytes, spill_dir / f"{name}.f32")
            for row, i in enumerate(batch_ids):
                store[offsets[i] : offsets[i + 1]] = hidden[row, : lengths[i]]
    finally:
        model.train(was_training)
    assert store is not None
    return [
        {"hidden": torch.from_numpy(store[offsets[i] : offsets[i + 1]]), "label": it["label"], "start_block": k}
        for i, it in enumerate(items)
    ]


def _split_matches(model: Any, batch: dict[str, torch.Tensor], k: int) -> bool:
    """Whether blocks k.. run on the cached states give the full forward's features.

    Checked in fp32 on two rows of the first (longest) batch, its first and last, so that one of
    them is padded: three forwards of a whole batch in fp32 would cost more than the cache saves.
    """
    arch = type(model.backbone).__name__
    if not model.can_split(k):
        return warn_uncached(f"{arch} cannot start at block {k}")
    rows = [0, len(batch["input_ids"]) - 1]
    ids, mask = batch["input_ids"][rows], batch["attention_mask"][rows]
    types = batch["token_type_ids"][rows] if "token_type_ids" in batch else None
    full = model.encode(ids, mask, types)  # (B, H)
    try:
        split = model.encode_suffix(model.encode_prefix(ids, mask, types, k), mask, k)
    except (TypeError, ValueError, AttributeError, IndexError) as exc:  # a forward the split view does not fit
        return warn_uncached(f"{arch}: splitting at block {k} failed ({exc})")
    if not torch.allclose(split, full, rtol=1e-4, atol=1e-5):
        return warn_uncached(
            f"{arch}: split at block {k} differs from the full forward by {(split - full).abs().max():.2e}"
        )
    return True


def cache_text_items(
    objective: Any,
    model: Any,
    items: Sequence[dict[str, Any]],
    k: int | None,
    runtime: Runtime,
    max_bytes: int,
    spill_dir: Path,
    name: str,
) -> list[dict[str, Any]]:
    """`cache_frozen` of the text objectives (assigned as their method): pooled features when nothing
    before the head trains (`k` None), else the token states entering block `k`; the items unchanged
    where the model cannot be split there."""
    size, autocast = runtime.eval_batch_size, runtime.autocast
    if k is None:
        return cache_features(model, items, objective.collate, size, autocast, max_bytes, spill_dir, name)
    hidden = cache_hidden(model, items, objective.collate, size, autocast, max_bytes, spill_dir, name, k)
    return list(items) if hidden is None else hidden


def warn_uncached(why: str) -> bool:
    warnings.warn(f"{why}; the frozen blocks will run at every step instead of once", stacklevel=4)
    return False


def _on_device(batch: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {key: value.to(device) for key, value in batch.items()}


def allocate_store(rows: int, width: int, max_bytes: int, path: Path) -> np.ndarray:
    if rows * width * 4 <= max_bytes:
        return np.zeros((rows, width), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, width))
