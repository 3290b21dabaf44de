"""Catastrophic forgetting, measured (DESIGN §9): what the base model knew, before training and at
every evaluation.

The retention set is text the task does not train on (for causal LMs by default Acts IV-V of the
packaged Hamlet: general English; replay, if any, should come from elsewhere, e.g. hamlet-replay).
Its perplexity (or, for a classifier, accuracy on a labelled set) is taken before the first step as
the baseline, then again at every evaluation. The change is relative: +0.10 perplexity change means
10% more perplexed than the base model. With `eval.retention.max_drop` the loop stops once the
change for the worse passes the bound and keeps the best checkpoint among the evaluations within it
(McCloskey & Cohen 1989 named the problem; Kirkpatrick et al. 2017 measure it this way).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.eval.evaluate import evaluate_items

__all__ = ["Retention", "build_retention"]

DEFAULT_TEXT = "hamlet-retention"  # packaged general English: Acts IV-V of Hamlet (zoo.py)


@dataclass
class Retention:
    """A retention set, encoded, and the base model's score on it once measured."""

    metric: str  # "perplexity" (lower is better) or "accuracy"
    items: Sequence[dict[str, Any]]
    objective: Any
    batch_size: int
    max_drop: float | None
    source: str
    baseline: float | None = None

    def measure(self, model: Any, autocast: Callable[[], Any], device: torch.device) -> dict[str, Any]:
        """The score now, against the baseline (the first measurement becomes the baseline)."""
        metrics = evaluate_items(model, self.objective, self.items, self.batch_size, autocast, device)
        if self.metric not in metrics:
            raise ConfigError(f"eval.retention.metric={self.metric}: this task reports {sorted(metrics)}")
        value = float(metrics[self.metric])
        if self.baseline is None:
            self.baseline = value
        change = (value - self.baseline) / max(abs(self.baseline), 1e-12)
        worse = change if self.metric == "perplexity" else -change
        return {
            "metric": self.metric,
            "value": value,
            "baseline": self.baseline,
            "change": change,
            "within_bound": self.max_drop is None or worse <= self.max_drop,
        }


def build_retention(cfg: RunConfig, objective: Any, read: Callable[[str], list[Any]]) -> Retention | None:
    """The run's retention set (None when `eval.retention` is not set).

    Args:
        read: reads a data source into the task's examples (files or packaged names).
    """
    from tunesmith.data.split import sample

    spec = cfg.eval.retention
    if spec is None:
        return None
    source = spec.data or (DEFAULT_TEXT if cfg.task == "sft" else None)
    if source is None:
        raise ConfigError(
            "eval.retention.data: a classifier has no default retention set; give labelled rows of a task "
            "the model should keep doing well (e.g. an earlier task's validation set)"
        )
    if cfg.task == "sft" and spec.metric == "accuracy":
        raise ConfigError("eval.retention.metric=accuracy: a causal LM's retention is measured as perplexity")
    examples = sample(read(source), spec.max_rows, cfg.train.seed)
    items = objective.encode(examples, "retention")
    return Retention(spec.metric, items, objective, cfg.eval.batch_size, spec.max_drop, source)
