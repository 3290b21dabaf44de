"""Returning the memory a forward pass frees to the operating system as it goes (`train.trim_memory_every`).

A training forward pass allocates temporaries between the activations it keeps for the backward
pass. glibc's allocator keeps the freed temporaries' pages, so the process's resident memory at the
end of the forward pass, its peak, holds both: in a SmolLM2 LoRA step of 8 x 256 tokens, 4.7 GB
resident for 2.7 GB of saved activations. `malloc_trim(0)` hands the free pages back (it walks the
heap's free chunks and madvises the whole pages in them away); called after every few transformer
blocks it keeps the holes from accumulating: peak memory fell 20-30% there, at 8-20% more step time,
since the next temporaries fault their pages in again. It is glibc's own call, reached with ctypes
(no maintained Python package wraps it); elsewhere (macOS, musl) the setting does nothing, and so it
does when the model trains on an accelerator (its activations are not in the process's heap).

Handing pages back is not free where there is little to hand back: the next temporaries fault the
pages in again. Measured on a 2-core Xeon, SmolLM2 LoRA:
- an epoch of 128 rows up to 256 tokens (batch 8): peak resident memory 3.3-3.5 GB untrimmed,
  2.1 GB trimming after every block, 2.2 GB after every 3rd, 2.3 GB after every 10th (each 10-15%
  more time), 2.9 GB once at the end of the forward pass (no measurable cost);
- rows of 512 tokens (batch 8): 14.2 GB untrimmed, 7.0 GB trimming after every 3rd block, and
  faster (55 against 76-81 s): the untrimmed heap's growth costs more than the faults.
So `auto` (the default) trims after a block that finds resident memory `AUTO_GROWTH_ROOMY` (1 GB)
above where the pass began or last trimmed, or `AUTO_GROWTH` (256 MB) above while less than
`PRESSURE` of the machine's memory is available: short rows on a roomy machine pay nothing (the
256-token epoch above: 3.3 GB, untrimmed speed), long rows trim every few blocks (the 512-token
one: 7.5 GB, 61 s).
Tried and left out: serving large blocks from the heap instead (glibc's `mallopt`, mmap threshold
256 MB). glibc maps each block over 32 MB afresh, so a block a step allocates every step (full
fine-tuning of MiniLM: the 47 MB dense gradient of the word embeddings) is faulted in page by page
every step; from the heap, faults fell from 12,500 to 900 a step and that epoch was 4% faster in
interleaved runs (2-core EPYC), but no faster beyond the machine's drift in the benchmarks. And a
freed block was often not reused by the next one of its size: a loop allocating and freeing a
45 MB tensor grew resident memory by 45 MB an iteration for 7 iterations before it reused one. A
few percent of speed is not worth a peak that depends on the heap's history.
Tried and left out, the other way: every block over 4 MB mapped afresh and unmapped when freed
(`MALLOC_MMAP_THRESHOLD_`, which also stops glibc raising the threshold), and trimming after any
block that finds more than 1 GB resident beyond what the heap has in use (`mallinfo2`). A SmolLM2
LoRA DPO step of 4 pairs x 512 tokens (2-core Xeon with AMX, 2.86 GB in use at most) peaked at
4.9 GB resident under `auto` at 17.2 s a step; at 3.4 GB with the low threshold, and 4.0 GB with the
in-use rule, but at 23.7 and 24.5 s a step: the pages handed back are faulted in again, and zeroed,
by the next block's temporaries.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Any

import psutil
import torch
from torch import nn

__all__ = ["AUTO_GROWTH", "own_weights", "release_free_memory", "trim_between_blocks"]

AUTO_GROWTH = 256 * 2**20  # resident growth in a training forward pass that calls for a trim when memory is short
AUTO_GROWTH_ROOMY = 2**30  # and when it is not
PRESSURE = 0.25  # memory is short while less than this share of the machine's memory is available


def trim_between_blocks(model: nn.Module, every: int | str, device: torch.device | None = None) -> list[Any]:
    """Call `malloc_trim(0)` after the forward pass of every `every`-th transformer block (the classes
    a Hugging Face model names in `_no_split_modules`) while gradients are recorded, or under `auto`
    after any block that finds resident memory `AUTO_GROWTH` above where the pass began or last
    trimmed; returns the hook handles ([] where glibc or the blocks are missing, or the model is on an
    accelerator)."""
    trim = _malloc_trim()
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    on_host = device is None or device.type == "cpu"
    if trim is None or every == 0 or not blocks or not on_host:
        return []
    if every == "auto":
        return _trim_on_growth(blocks, trim)

    def after(module: nn.Module, args: Any, output: Any) -> None:
        if torch.is_grad_enabled():  # a training pass; evaluation keeps nothing to trim around
            trim(0)

    return [block.register_forward_hook(after) for block in blocks[int(every) - 1 :: int(every)]]


def _trim_on_growth(blocks: list[nn.Module], trim: Callable[[int], int]) -> list[Any]:
    process = psutil.Process()
    since = [0]  # resident bytes when the pass began or last trimmed

    def first(module: nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            since[0] = process.memory_info().rss

    def after(module: nn.Module, args: Any, output: Any) -> None:
        grown = process.memory_info().rss - since[0] if torch.is_grad_enabled() else 0
        if grown > AUTO_GROWTH_ROOMY or (grown > AUTO_GROWTH and _short_of_memory()):
            trim(0)
            since[0] = process.memory_info().rss

    return [blocks[0].register_forward_pre_hook(first)] + [block.register_forward_hook(after) for block in blocks]


def own_weights(model: nn.Module) -> int:
    """Copy into the process's own memory every parameter and buffer that still reads a checkpoint's
    memory-mapped file; returns how many were copied.

    A model loads its weights as views of the checkpoint file, mapped into memory: no copy, and the
    file's pages count as resident once read. Where some weights are then replaced by copies (the
    frozen linear weights stored in bf16), the rest (embeddings, norms) keep the whole mapping, and
    so every page of the file, resident beside the copies: in a SmolLM2 LoRA run, 513 MB of the
    fp32 file for 110 MB of embeddings and norms. Copied, the mapping goes when the last view does.
    A storage torch does not own is one it cannot resize; weights that own their memory are left.
    """
    copied = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.device.type == "cpu" and not param.untyped_storage().resizable():
                param.data = param.data.clone()
                copied += 1
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.device.type == "cpu" and not buffer.untyped_storage().resizable():
                module._buffers[name] = buffer.clone()
                copied += 1
    return copied


def release_free_memory() -> None:
    """Hand the pages the allocator holds free back to the system now (`malloc_trim(0)`; nothing
    without glibc). Called between phases whose temporaries differ in size, training steps and
    evaluation: each phase's freed blocks otherwise stay resident while the next one, unable to reuse
    them, grows the heap. Whisper-tiny full fine-tuning (batch 32, evaluation at 64): evaluation
    peaked at 751 MB, above the steps' 744; with the trim it stays below them (725), and between
    phases the process holds 545 MB instead of 713. The pages given back are faulted in again by the
    next phase, once per evaluation."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _short_of_memory() -> bool:
    """Whether the machine has less than `PRESSURE` of its memory available."""
    memory = psutil.virtual_memory()
    return memory.available < PRESSURE * memory.total


def _malloc_trim() -> Callable[[int], int] | None:
    path = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(path).malloc_trim if path else None
    except (OSError, AttributeError):
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim
