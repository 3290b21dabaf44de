"""Batch order for an epoch: a pure function of (seed, epoch), so a resumed run sees the same
batches from the same position. Length grouping sorts rows of similar length into one batch
inside shuffled "megabatches", which cuts padding without giving up randomness."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["epoch_batches", "eval_batches"]

MEGABATCH = 50  # batches per length-sorted window (as in the Hugging Face length-grouped sampler)


def epoch_batches(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """Index lists, one per micro-batch, for training epoch `epoch`."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=gen).tolist()
    if not group_by_length:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * MEGABATCH
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=gen).tolist()
    batches = [batches[i] for i in shuffle]
    # The longest batch goes first (as in Hugging Face's length-grouped sampler): the allocator
    # then sizes its pools once, and later, smaller batches reuse them instead of fragmenting.
    longest = max(range(len(batches)), key=lambda j: max(lengths[i] for i in batches[j]))
    batches.insert(0, batches.pop(longest))
    return batches


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: sorted by length (least padding); order does not change metrics."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
