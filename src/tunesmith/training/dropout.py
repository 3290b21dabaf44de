"""A faster dropout for CPU training.

`torch.nn.Dropout` draws one Bernoulli sample per element, which on a CPU costs about 100 times
an elementwise multiply: in a LoRA step of MiniLM it was a third of the step's time. This dropout
draws 64 random bits at a time and uses each 16 as one uniform sample, so the keep probability
is exact to 1/65536, and the cost falls about tenfold. It reads the global torch RNG, so seeding
and exact resume behave as with `nn.Dropout`. Whether it or torch's own kernel runs is measured on
each machine (training/kernels.py).

`DroppedLinear` folds a LoRA adapter's input dropout into its first matrix, so that the backward
pass keeps the shared input once (see `dropped_linear`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DroppedLinear", "FastDropout", "dropped_linear", "fast_dropout", "use_fast_dropout"]

_LEVELS = 65536  # 16 uniform bits per element


def fast_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each element with probability p (to 1/65536) and scale the rest by 1/(1-p')."""
    if p >= 1.0:
        return torch.zeros_like(x)
    drop, scale = _drop_mask(x.shape, p, x.device)
    return _MaskedScale.apply(x, drop, scale)


def _drop_mask(shape: torch.Size, p: float, device: torch.device) -> tuple[torch.Tensor, float]:
    """A boolean mask of what is dropped (1 byte per element), and the scale of what is kept."""
    n = shape.numel()
    # Over the whole int64 range every 16-bit lane of a word is uniform over int16.
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    lanes = words.view(torch.int16)[:n].view(shape)
    threshold = round(p * _LEVELS)
    return lanes < threshold - _LEVELS // 2, _LEVELS / (_LEVELS - threshold)


class _MaskedScale(torch.autograd.Function):
    """x with the dropped elements zeroed and the rest scaled; saves only the 1-byte mask for
    backward (as torch's dropout does), not a mask in x's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(drop)
        ctx.scale = scale
        return x.masked_fill(drop, 0) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (drop,) = ctx.saved_tensors
        return grad.masked_fill(drop, 0) * ctx.scale, None, None


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
    """`linear(dropout(x, p), weight)` that saves `x` itself and a 1-byte mask for the backward
    pass, not a dropped copy of `x`.

    This is what makes LoRA's dropout cheap in memory: the query, key and value adapters read the
    same `x`, which is saved once for the three of them (and shared with whatever else saves it),
    plus three masks, instead of three dropped copies and three masks: 7 bytes per element of `x`
    instead of 15 in fp32. The scale is applied to the (narrow) output rather than to `x`.
    """
    if p >= 1.0:
        return torch.nn.functional.linear(torch.zeros_like(x), weight)
    drop, scale = _drop_mask(x.shape, p, x.device)
    return _DroppedLinear.apply(x, weight, drop, scale)  # type: ignore[no-any-return]


class _DroppedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, drop: torch.Tensor, scale: float) -> torch.Tensor:
        # Under autocast the matmul runs in the autocast dtype, as nn.Linear's would.
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx.save_for_backward(x, weight, drop)
        ctx.scale, ctx.dtype = scale, dtype
        dropped = x.masked_fill(drop, 0).to(dtype)
        return torch.nn.functional.linear(dropped, weight.to(dtype)) * scale

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, drop = ctx.saved_tensors
        grad = (grad * ctx.scale).to(ctx.dtype)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad @ weight.to(ctx.dtype)).masked_fill_(drop, 0).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dropped = x.masked_fill(drop, 0).to(ctx.dtype)
            grad_w = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(weight.dtype)
        return grad_x, grad_w, None, None


class DroppedLinear(nn.Linear):
    """An `nn.Linear` (bias-free) that applies dropout `p` to its input in training (`dropped_linear`);
    its parameters and state-dict keys are those of the `nn.Linear` it replaces."""

    p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return super().forward(x)
        return dropped_linear(x, self.weight, self.p)
