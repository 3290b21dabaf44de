"""The learning-rate schedules (`train.scheduler`): a linear warm-up over `warmup` steps, then
linear decay to 0, half a cosine to 0, or the peak rate held.

These are the formulas of transformers' `get_scheduler` ("linear", "cosine"), on torch's own
`LambdaLR`. transformers' function is not used because importing it (`transformers.optimization`
imports its trainer utilities, peft, sympy and scipy) added about 160 MB of resident memory to
every run, more than a vision run's whole training state. Unlike transformers' "constant", the
constant schedule here warms up too, as the config documents for every schedule.
"""

from __future__ import annotations

import math
from functools import partial

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["SCHEDULES", "schedule", "schedule_factor"]

SCHEDULES = ("linear", "cosine", "constant")


def schedule_factor(name: str, step: int, warmup: int, total: int) -> float:
    """The multiple of the peak learning rate at `step` (0-based) of `total`."""
    if step < warmup:
        return step / max(1, warmup)
    if name == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if name == "linear":
        return max(0.0, 1.0 - progress)
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")


def schedule(name: str, optimizer: torch.optim.Optimizer, warmup: int, total: int) -> LambdaLR:
    """`optimizer`'s learning rates scaled by `schedule_factor` at each `scheduler.step()`."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; expected one of {SCHEDULES}")
    return LambdaLR(optimizer, partial(schedule_factor, name, warmup=warmup, total=total))
