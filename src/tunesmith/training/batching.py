"""Batch order for an epoch: a pure function of (seed, epoch), so a resumed run sees the same
batches from the same position. Length grouping sorts rows of similar length into one batch
inside shuffled "megabatches", which cuts padding without giving up randomness. And the width a
batch is padded to."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["PAD_MULTIPLE", "epoch_batches", "padded_width", "total_steps"]

MEGABATCH = 50  # batches per length-sorted window (as in the Hugging Face length-grouped sampler)
PAD_MULTIPLE = 8


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


def padded_width(longest: int, max_length: int) -> int:
    """The width a batch is padded to: its longest row rounded up to a multiple of PAD_MULTIPLE,
    never past `max_length` (unless the row itself is longer).

    Fewer distinct shapes let the CPU matmul library (oneDNN) reuse its cached kernels and buffers:
    with one shape per length, its cache grew peak memory by ~25% in a LoRA run.
    """
    rounded = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    return min(rounded, max(longest, max_length))


def total_steps(n_items: int, batch_size: int, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a run over `n_items` training items (`max_steps` if set)."""
    steps_per_epoch = math.ceil(math.ceil(n_items / batch_size) / grad_accum)
    return max_steps or math.ceil(epochs * steps_per_epoch)
