"""Frozen work done once: when nothing before the head trains, the backbone runs in eval mode
once per run and its pooled features replace the token ids, so later epochs train the head alone.

Features live in memory up to a size bound and spill to a memory-mapped file on disk past it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunesmith.training.batching import eval_batches

__all__ = ["cache_features"]


@torch.no_grad()
def cache_features(
    model: Any,
    items: Sequence[dict[str, Any]],
    collate: Callable[[Sequence[dict[str, Any]]], dict[str, torch.Tensor]],
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
            batch = collate([items[i] for i in batch_ids])
            with autocast():
                feats = model.encode(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))
            feats = feats.float().cpu().numpy()  # (B, H)
            if store is None:
                store = _allocate(len(items), feats.shape[1], max_bytes, spill_dir / f"{name}.f32")
            store[batch_ids] = feats
    finally:
        model.train(was_training)
    assert store is not None
    return [{"features": torch.from_numpy(store[i]), "label": it["label"]} for i, it in enumerate(items)]


def _allocate(rows: int, width: int, max_bytes: int, path: Path) -> np.ndarray:
    if rows * width * 4 <= max_bytes:
        return np.zeros((rows, width), dtype=np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.memmap(path, dtype=np.float32, mode="w+", shape=(rows, width))
