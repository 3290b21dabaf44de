"""The optimizer: AdamW, through torch's fused kernel where the parameters' device has one.

torch's AdamW on a CPU defaults to its per-tensor loop: about ten elementwise operations per
parameter tensor, each one pass over the tensor and, for a LoRA run's hundreds of small tensors,
each with its dispatch overhead. The fused kernel (torch >= 2.4 on CPUs) updates a tensor in one
pass. The arithmetic is AdamW's; the state dict has the same entries, so a checkpoint written by
either loads into the other.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["adamw"]

_FUSED_DEVICES = {"cpu", "cuda", "xpu", "mps"}


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """`torch.optim.AdamW(groups, lr=lr)`, fused where every parameter allows it."""
    params = [p for group in groups for p in group["params"]]
    fusable = all(p.is_floating_point() and p.device.type in _FUSED_DEVICES for p in params)
    fusable = fusable and len({p.device for p in params}) <= 1
    return torch.optim.AdamW(groups, lr=lr, fused=True) if fusable else torch.optim.AdamW(groups, lr=lr)
