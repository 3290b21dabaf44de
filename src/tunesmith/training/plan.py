"""What a run records about its training: the plan before the first step (plan.json: steps,
precision, exact trainable-parameter count; the loop adds the learning rates) and the summary after
the last (eval.json's `train`: steps, time, throughput, memory)."""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from tunesmith.config import TrainConfig
from tunesmith.runs import peak_rss_mb
from tunesmith.runtime import bf16_probe, conv_precision_probe, trains_convolutions
from tunesmith.training.batching import total_steps
from tunesmith.training.loop import LoopResult

__all__ = ["report_dropped", "run_plan", "train_summary"]


def run_plan(
    cfg: TrainConfig, precision: str, model: nn.Module, names: list[str], n_items: int, processes: int = 1
) -> dict[str, Any]:
    """Steps, precision and parameter counts (with the names of what trains); an optimizer step takes
    `grad_accum` micro-batches in each of `processes` processes. The loop adds the learning rates
    once it has chosen them (`lr`, `head_lr`, `lr_rule`, and `lr_finder` for `lr: auto`)."""
    params = dict(model.named_parameters())
    measured = {}
    if cfg.precision == "auto" and not torch.cuda.is_available():
        measured = {"precision_probe": bf16_probe()}  # what `auto` measured on this CPU (cached)
        conv = conv_precision_probe(model, cfg.batch_size) if trains_convolutions(model) else None
        if conv is not None:  # a conv net that trains: its own steps decided (runtime.resolve_precision)
            measured["conv_precision_probe"] = conv
    return {
        "total_steps": total_steps(n_items, cfg.batch_size, cfg.grad_accum * processes, cfg.epochs, cfg.max_steps),
        "processes": processes,
        "global_batch": cfg.batch_size * cfg.grad_accum * processes,
        "precision": precision,
        **measured,
        "trainable_parameters": sum(params[n].numel() for n in names if n in params),
        "total_parameters": sum(p.numel() for p in params.values()),
        "trainable_names": names,
    }


def train_summary(
    result: LoopResult, model: nn.Module, names: list[str], precision: str, wall: float
) -> dict[str, Any]:
    """What eval.json records about training: steps, time, throughput, memory, precision, weights."""
    seconds = max(result.train_seconds, 1e-9)
    trained = set(names)
    return {
        "steps": result.steps,
        "train_seconds": round(result.train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "samples": result.samples,
        "tokens": result.tokens,
        "samples_per_second": result.samples / seconds,
        "tokens_per_second": result.tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "best": result.best,
        "stopped_early": result.stopped_early,
        "skipped_steps": result.skipped_steps,
        "precision": precision,
        "trainable_parameters": sum(p.numel() for n, p in model.named_parameters() if n in trained),
    }


def report_dropped(counts: dict[str, dict[str, int]]) -> None:
    """One line on stderr for every split that lost or cut rows (also in plan.json)."""
    for split, c in counts.items():
        lost = {k: c.get(k, 0) for k in ("truncated", "dropped_overlong", "no_trainable_token") if c.get(k, 0)}
        if lost:
            detail = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in lost.items())
            print(f"{split}: {c['rows']} rows, {detail} (see data.overlong, data.max_length)", file=sys.stderr)
