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

from tunesmith.config import RetentionConfig
from tunesmith.data.split import sample
from tunesmith.errors import ConfigError
from tunesmith.eval.evaluate import evaluate_items
from tunesmith.runtime import Runtime

__all__ = ["Retention", "build_retention"]


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

    def measure(self, model: Any, runtime: Runtime) -> dict[str, Any]:
        """The score now, against the baseline (the first measurement becomes the baseline)."""
        metrics = evaluate_items(model, self.objective, self.items, runtime, self.batch_size)
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

    def summary(self, model: Any, runtime: Runtime, history: list[dict[str, Any]]) -> dict[str, Any]:
        """The final model's retention against the base model's, the history of evaluations, and
        whether training stopped for it (what eval.json records)."""
        return {
            **self.measure(model, runtime),
            "source": self.source,
            "max_drop": self.max_drop,
            "history": history,
            "stopped_for_retention": any(not r["within_bound"] for r in history),
        }


def build_retention(
    spec: RetentionConfig | None,
    default_source: str | None,
    metrics: Sequence[str],
    objective: Any,
    read: Callable[[str], list[Any]],
    seed: int,
    batch_size: int,
) -> Retention | None:
    """The run's retention set (None when `eval.retention` is not set).

    Args:
        spec: `eval.retention`.
        default_source: the task's retention set when `spec` names none (None: the task has none).
        metrics: the metrics of the task's evaluation that retention may watch.
        read: reads a data source into the task's examples (files or packaged names).
    """
    if spec is None:
        return None
    source = spec.data or default_source
    if source is None:
        raise ConfigError(
            "eval.retention.data: this task has no default retention set; give rows in its format of what the "
            "model should keep doing well (e.g. an earlier task's validation set)"
        )
    if spec.metric not in metrics:
        shown = ", ".join(metrics) or "none of eval.retention's metrics"
        raise ConfigError(f"eval.retention.metric={spec.metric}: this task's evaluation reports {shown}")
    examples = sample(read(source), spec.max_rows, seed)
    items = objective.encode(examples, "retention")
    return Retention(spec.metric, items, objective, batch_size, spec.max_drop, source)
