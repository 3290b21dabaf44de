"""A faster dropout for CPU training.

`torch.nn.Dropout` draws one Bernoulli sample per element, which on a CPU costs about 100 times
an elementwise multiply: in a LoRA step of MiniLM it was a third of the step's time. This dropout
draws 64 random bits at a time and uses each 16 as one uniform sample, so the keep probability
is exact to 1/65536, and the cost falls about tenfold. Its draws follow the global torch RNG, so
seeding and exact resume behave as with `nn.Dropout`. Whether it or torch's own kernel runs is measured on
each machine (training/kernels.py).

`DroppedLinear` folds a LoRA adapter's input dropout into its first matrix, so that the backward
pass keeps the shared input once (see `dropped_linear`).

Neither keeps its mask for the backward pass as torch's dropout does, one byte an element: it
keeps it packed, one bit an element. In a SmolLM2 LoRA step (8 x 256 tokens) the byte masks were
290 MB of 2.3 GB saved; packed they are 36 MB. Packing and unpacking cost a few elementwise passes
over the mask, under a fifth of drawing it again from the RNG state it came from (which the
previous version did, keeping nothing of the mask's size).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from tunesmith.models.recompute import recipe

__all__ = ["DropMask", "DroppedLinear", "FastDropout", "dropped_linear", "fast_dropout", "use_fast_dropout"]

_LEVELS = 65536  # 16 uniform bits per element
_NO_WORDS = torch.empty(0, dtype=torch.int64)


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each element with probability p (to 1/65536) and scale the rest by 1/(1-p')."""
    if p >= 1.0:
        return torch.zeros_like(x)
    return _MaskedScale.apply(x, DropMask(x.shape, p, x.device))  # type: ignore[no-any-return]


def _lanes(shape: torch.Size, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform int16 per element of `shape`, four to each 64-bit random word.

    On a CPU the words come from numpy's SFC64 generator, seeded by one draw of the torch RNG (so
    the masks still follow `torch.manual_seed` and a resumed run's RNG state): it makes them in
    about half the time of torch's Mersenne Twister (190 against 340 us for 100 k words), which was
    most of a mask's cost. torch has no faster CPU generator; elsewhere torch's own draws them.
    """
    n = shape.numel()
    count = (n + 3) // 4
    if device.type == "cpu":
        seed = int(torch.empty((), dtype=torch.int64).random_(0, 2**62, generator=generator))
        # (numpy 2.4 hands an empty array to torch with stride 0, which the int16 view below refuses)
        words = torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64)) if count else _NO_WORDS
    else:
        # Over the whole int64 range every 16-bit lane of a word is uniform over int16.
        words = torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    return words.view(torch.int16)[:n].view(shape)


def _kept(lanes: torch.Tensor, threshold: int, dtype: torch.dtype) -> torch.Tensor:
    """1 where an element is kept (its lane at or above `threshold`, counted from int16's lowest
    value), 0 where it is dropped, in `dtype`.

    A clamp to two values and a subtraction give the 0/1 directly: on a CPU torch compares int16
    into a bool tensor, and fills by a bool mask, each about 8 times slower than that clamp and than
    a multiplication by the 0/1 tensor (45 against 330 us for 400 k elements).
    """
    if threshold == 0:
        return torch.ones(lanes.shape, dtype=dtype, device=lanes.device)
    low = threshold - _LEVELS // 2 - 1  # lanes <= low are dropped
    return lanes.clamp(low, low + 1).sub_(low).to(dtype)


def _drop_mask(
    shape: torch.Size, p: float, device: torch.device, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, float]:
    """A boolean mask of what is dropped (the same draw as `DropMask`), and the scale of what is kept."""
    threshold = round(p * _LEVELS)
    return _lanes(shape, device, generator) < threshold - _LEVELS // 2, _LEVELS / (_LEVELS - threshold)


class DropMask:
    """A dropout mask drawn from the global RNG, applied by multiplying with its 0/1 form (`kept`),
    and kept for the backward pass at one bit an element."""

    def __init__(self, shape: torch.Size, p: float, device: torch.device) -> None:
        self.shape = shape
        self.threshold = round(p * _LEVELS)
        self.scale = _LEVELS / (_LEVELS - self.threshold)
        self.bytes: torch.Tensor | None = _kept(_lanes(shape, device), self.threshold, torch.uint8)

    def kept(self, dtype: torch.dtype) -> torch.Tensor:
        """The mask for the forward pass: 1 where kept, 0 where dropped, in `dtype`."""
        assert self.bytes is not None, "the forward pass is done with it"
        return self.bytes.to(dtype)

    def keep(self, ctx: Any, *tensors: torch.Tensor) -> None:
        """`ctx.save_for_backward(*tensors)`, plus the mask packed to one bit an element."""
        assert self.bytes is not None, "kept once"
        ctx.save_for_backward(*tensors, _pack_bits(self.bytes))
        ctx.mask = self
        self.bytes = None  # the forward pass is done with it

    def restore(self, ctx: Any, dtype: torch.dtype) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """The tensors `keep` saved, and the mask as `kept` gave it."""
        saved = ctx.saved_tensors
        return saved[:-1], _unpack_bits(saved[-1], self.shape).to(dtype)


# Multiplying a 64-bit word of eight 0/1 bytes by this moves byte i's bit to bit 56 + i; no two of
# the products' bits meet (no carries), so the top byte is the eight bits packed.
_GATHER = sum(1 << (56 - 7 * i) for i in range(8))  # 0x0102040810204080


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 0/1 uint8 tensor packed eight elements to a byte (element 8j + i at bit i of byte j).

    torch has no bit-packing op (numpy's `packbits` would leave the device): this is a multiplication
    of an eighth as many words and a strided copy of their top bytes.
    """
    flat = mask.reshape(-1)
    if flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(8 - flat.numel() % 8)])
    words = flat.view(torch.int64)  # little-endian: element 8j + i is byte i of word j
    return words.mul(_GATHER).view(torch.uint8)[7::8].contiguous()  # the top byte of each word


_SPREAD: dict[torch.device, torch.Tensor] = {}  # byte value -> its eight bits as eight 0/1 bytes, one int64


def _unpack_bits(bits: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The 0/1 uint8 tensor of `shape` that `_pack_bits` packed: a lookup of each byte's eight
    bytes (40 us for 400 k elements, against 280 for shifting by a broadcast of the eight shifts)."""
    table = _SPREAD.get(bits.device)
    if table is None:
        spread = [[(value >> i) & 1 for i in range(8)] for value in range(256)]
        table = torch.tensor(spread, dtype=torch.uint8).view(torch.int64).view(-1).to(bits.device)
        _SPREAD[bits.device] = table
    return table.index_select(0, bits.long()).view(torch.uint8)[: shape.numel()].view(shape)


class _MaskedScale(torch.autograd.Function):
    """x with the dropped elements zeroed and the rest scaled; keeps only the mask, at one bit an
    element, for backward: not x, and not a mask in x's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mask: DropMask) -> torch.Tensor:
        out = x.mul(mask.kept(x.dtype)).mul_(mask.scale)
        mask.keep(ctx)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        _, kept = ctx.mask.restore(ctx, grad.dtype)
        return grad.mul(kept).mul_(ctx.mask.scale), None


class FastDropout(nn.Dropout):
    """Drop-in for `nn.Dropout` (same `p`, same train/eval behaviour)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return fast_dropout(x, self.p)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every `nn.Dropout` in `model` for `FastDropout` in place; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, name, FastDropout(child.p, child.inplace))
                swapped += 1
    return swapped


def dropped_linear(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """`linear(dropout(x, p), weight)` that keeps `x` itself for the backward pass, not a dropped
    copy of `x`, and its mask at one bit an element (`DropMask`).

    This is what makes LoRA's dropout cheap in memory: the query, key and value adapters read the
    same `x`, which is kept once for the three of them (and shared with whatever else keeps it),
    instead of three dropped copies and three masks: 4 bytes per element of `x` instead of 15 in
    fp32. Where `x` is cheap to compute again (models/recompute.py: a normalization's output, a
    gated MLP's product), not even `x` is kept. The scale is applied to the (narrow) output rather
    than to `x`. `p` may be 0 (no dropout, the same saving).
    """
    if p >= 1.0:
        return torch.nn.functional.linear(torch.zeros_like(x), weight)
    return _DroppedLinear.apply(x, weight, DropMask(x.shape, p, x.device) if p > 0 else None)  # type: ignore[no-any-return]


class _DroppedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, mask: DropMask | None) -> torch.Tensor:
        # Under autocast the matmul runs in the autocast dtype, as nn.Linear's would.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        again = recipe(x)  # x from what autograd keeps anyway, or x itself
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        ctx.again, inputs = again if again is not None else (None, (x,))
        kept = (*inputs, weight)
        if mask is None:
            out = torch.nn.functional.linear(x.to(dtype), weight.to(dtype))
            ctx.save_for_backward(*kept)
            ctx.mask = None
        else:
            out = torch.nn.functional.linear(x.to(dtype) * mask.kept(dtype), weight.to(dtype)) * mask.scale
            mask.keep(ctx, *kept)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        saved, kept = (ctx.saved_tensors, None) if ctx.mask is None else ctx.mask.restore(ctx, ctx.dtype)
        weight = saved[-1]
        if ctx.mask is not None:
            grad = grad * ctx.mask.scale
        grad = grad.to(ctx.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight.to(ctx.dtype)
            if kept is not None:
                grad_x.mul_(kept)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            x = ctx.again(*saved[:-1]) if ctx.again is not None else saved[0]
            dropped = x.to(ctx.dtype) if kept is None else x.to(ctx.dtype) * kept
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None


class DroppedLinear(nn.Linear):
    """An `nn.Linear` (bias-free) that applies dropout `p` to its input in training (`dropped_linear`);
    its parameters and state-dict keys are those of the `nn.Linear` it replaces."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.is_grad_enabled():
            return super().forward(x)
        return dropped_linear(x, self.weight, self.p)
