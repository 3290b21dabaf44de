"""The learning-rate range test behind `train.lr: auto` (Smith 2017, "Cyclical Learning Rates for
Training Neural Networks", §3.3; fastai's `lr_find`).

Train for `train.lr_find_steps` optimizer steps while the learning rate grows exponentially from
1e-7 to 1, and stop once the loss diverges (its running average passes 4x its lowest). The steps
are the loop's own: its batches (frozen features cached where the method caches), the objective's
collate, model inputs and loss, AdamW with the run's weight decay, gradient accumulation and
clipping (its batches shuffled without length grouping, so that each step's loss comes from a
like batch). Afterwards every trained weight and buffer, every module's train/eval mode and every RNG
state is put back, and the test's optimizer is thrown away: training starts exactly as it would
have without the test.

The rule that picks the rate from the curve is min/10: a tenth of the rate at the smoothed loss's
minimum (Smith's "an order of magnitude below where the loss stops falling"; fastai's `lr_min`).
It was chosen over the steepest-descent point by measurement (README, "Learning rates"). A new
head trains at its own rate from the first step of the sweep, so the loss falls fastest at the
very start, where the head learns and the rest barely moves: the steepest point sat at 2e-7 on
EfficientNet-Lite0 (full and partial) and at 3e-6 on MiniLM (partial), far below anything that
trains. The minimum is where the pre-trained weights start to break, and a tenth of it is a safe rate:
for full and partial fine-tuning on both packaged sets min/10 chose 2-4x below the best fixed
rate measured, never above it. It is conservative; the steepest point is recorded beside it.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from tunesmith.training.batching import epoch_batches
from tunesmith.training.checkpoint import rng_state, set_rng_state
from tunesmith.training.optim import adamw

__all__ = [
    "END_LR",
    "RULE",
    "START_LR",
    "Curve",
    "choose_lr",
    "exponential_lrs",
    "range_test",
    "smooth",
    "steepest_lr",
    "step_batches",
]

START_LR, END_LR = 1e-7, 1.0
DIVERGENCE = 4.0  # stop once the running loss passes this multiple of its lowest value
RUNNING_BETA = 0.9  # the running average that detects divergence as the test goes (fastai: 0.98 over 100 steps)
SMOOTH_DECADES = 0.2  # half-width of the centred average the rule reads, in decades of learning rate
RULE = "min/10: a tenth of the rate at the smoothed loss's minimum"


@dataclass(frozen=True)
class Curve:
    """What a range test saw: the rates tried, the loss at each (raw and smoothed), why it stopped."""

    lrs: list[float]
    raw_losses: list[float]
    losses: list[float]  # centred moving average of raw_losses: what the rule reads
    stop: str  # "diverged", "non-finite loss" or "end of range"
    seconds: float

    def record(self, chosen: float | None) -> dict[str, Any]:
        """plan.json's `lr_finder`: the curve, the choice and the rule."""
        return {**asdict(self), "chosen": chosen, "rule": RULE, "steepest": steepest_lr(self.lrs, self.losses)}


def exponential_lrs(steps: int, start: float = START_LR, end: float = END_LR) -> list[float]:
    """`steps` rates from `start` to `end`, evenly spaced on a log scale."""
    return [start * (end / start) ** (i / (steps - 1)) for i in range(steps)]


def smooth(losses: Sequence[float], half_width: int) -> list[float]:
    """Centred moving average (shorter windows at the ends): no lag, unlike a running average, so
    the minimum stays where the loss had it."""
    out = []
    for i in range(len(losses)):
        window = losses[max(0, i - half_width) : i + half_width + 1]
        out.append(sum(window) / len(window))
    return out


def choose_lr(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """The min/10 rule on a (smoothed) curve: a tenth of the rate at the lowest loss.

    Returns None when the minimum lies in the curve's first decade, so that a tenth of it would fall
    below the range tested: the loss never clearly fell, and the curve says nothing about a good rate.
    """
    if not lrs:
        return None
    best = min(range(len(losses)), key=losses.__getitem__)
    if lrs[best] < 10 * lrs[0]:
        return None
    return lrs[best] / 10


def steepest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float | None:
    """The rate where the (smoothed) loss falls fastest per decade, before its minimum (recorded for
    comparison; the rule is min/10)."""
    best = min(range(len(losses)), key=losses.__getitem__) if losses else 0
    if best < 2:
        return None
    slopes = [
        (losses[i + 1] - losses[i - 1]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i - 1])) for i in range(1, best)
    ]
    return lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]


def range_test(
    model: torch.nn.Module,
    names: Sequence[str],
    groups: list[dict[str, Any]],
    head_at: Callable[[float], float],
    step_loss: Callable[[torch.optim.Optimizer, list[list[int]]], float],
    batches: Iterator[list[list[int]]],
    steps: int,
) -> Curve:
    """Run the range test (the model in train mode), then put the model and every RNG back as they were.

    Args:
        names: what trains (parameters, and buffers that training changes): restored afterwards.
        groups: the method's optimizer groups with rates relative to lr (lr = 1), the head's at 0.
        head_at: the head's rate when the rest trains at lr (training/rates.py's rule, or a number).
        step_loss: one optimizer step on the given micro-batches (index lists into the training
            items) with the given optimizer; returns the step's loss.
        batches: each step's micro-batches (`step_batches`).
    """
    saved = _snapshot(model, names)
    relative = [float(g["lr"]) for g in groups]
    optimizer = adamw(groups, 1.0)
    started = time.perf_counter()
    try:
        model.train()
        lrs, raw, stop = _sweep(optimizer, relative, head_at, step_loss, batches, steps)
    finally:
        _restore(model, saved)
        optimizer.zero_grad(set_to_none=True)
    per_decade = (steps - 1) / math.log10(END_LR / START_LR)
    losses = smooth(raw, max(1, round(SMOOTH_DECADES * per_decade)))
    return Curve(lrs, raw, losses, stop, round(time.perf_counter() - started, 3))


def _sweep(optimizer, relative, head_at, step_loss, batches, steps) -> tuple[list[float], list[float], str]:
    lrs: list[float] = []
    raw: list[float] = []
    running, lowest = 0.0, math.inf
    bar = tqdm(total=steps, desc="lr range test", unit="step", file=sys.stderr, dynamic_ncols=True)
    with bar:
        for i, lr in enumerate(exponential_lrs(steps), start=1):
            for group, scale in zip(optimizer.param_groups, relative, strict=True):
                group["lr"] = lr * scale if scale > 0 else head_at(lr)
            loss = step_loss(optimizer, next(batches))
            if not math.isfinite(loss):
                return lrs, raw, "non-finite loss"
            lrs.append(lr)
            raw.append(loss)
            running = RUNNING_BETA * running + (1 - RUNNING_BETA) * loss
            debiased = running / (1 - RUNNING_BETA**i)
            lowest = min(lowest, debiased)
            bar.set_postfix({"lr": f"{lr:.1e}", "loss": f"{debiased:.4f}"}, refresh=False)
            bar.update(1)
            if debiased > DIVERGENCE * lowest:
                return lrs, raw, "diverged"
    return lrs, raw, "end of range"


def step_batches(lengths: Sequence[int], batch_size: int, grad_accum: int, seed: int) -> Iterator[list[list[int]]]:
    """The micro-batches of each optimizer step, epoch after epoch (shuffled as the loop's, without
    length grouping)."""
    epoch = 0
    while True:
        batches = epoch_batches(lengths, batch_size, seed, epoch, group_by_length=False)
        for start in range(0, len(batches), grad_accum):
            yield batches[start : start + grad_accum]
        epoch += 1


def _snapshot(model: torch.nn.Module, names: Sequence[str]) -> dict[str, Any]:
    """Copies of what trains and of every buffer (cheap, and a forward pass in train mode may change
    one: a batch norm's statistics), the modules' modes and every RNG state."""
    buffers = dict(model.named_buffers())
    tensors: dict[str, torch.Tensor] = {**dict(model.named_parameters()), **buffers}
    kept = dict.fromkeys([*names, *buffers])
    return {
        "tensors": {name: tensors[name].detach().clone() for name in kept},
        "live": {name: tensors[name] for name in kept},
        "modes": {name: m.training for name, m in model.named_modules()},
        "modules": dict(model.named_modules()),
        "rng": rng_state(),
    }


def _restore(model: torch.nn.Module, saved: dict[str, Any]) -> None:
    with torch.no_grad():
        for name, value in saved["tensors"].items():
            saved["live"][name].copy_(value)
            saved["live"][name].grad = None
    for name, training in saved["modes"].items():
        saved["modules"][name].training = training
    set_rng_state(saved["rng"])
