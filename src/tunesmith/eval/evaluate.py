"""Streamed evaluation: batches through the model, metrics updated per batch (no logits kept)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tunesmith.runtime import Runtime

__all__ = ["eval_batches", "evaluate_items", "predict_items", "score_items"]


@torch.no_grad()
def evaluate_items(
    model: Any, objective: Any, items: Sequence[dict[str, Any]], runtime: Runtime, batch_size: int | None = None
) -> dict[str, Any]:
    """Metrics of `model` over labelled `items` (model left in the mode it was in)."""
    metrics = objective.new_metrics()
    for _, batch, output in _outputs(model, objective, items, runtime, batch_size):
        metrics.update_batch(output, batch)
    return metrics.compute()  # type: ignore[no-any-return]


@torch.no_grad()
def predict_items(model: Any, objective: Any, items: Sequence[dict[str, Any]], runtime: Runtime) -> torch.Tensor:
    """Class probabilities (N, C) in input order."""
    probs = torch.empty((len(items), len(objective.labels)))
    for ids, _, logits in _outputs(model, objective, items, runtime):
        probs[ids] = logits.float().softmax(-1).cpu()
    return probs


@torch.no_grad()
def score_items(model: Any, objective: Any, items: Sequence[dict[str, Any]], runtime: Runtime) -> list[float]:
    """A reward model's scores of items in input order (each item scores one response, held twice)."""
    scores = torch.empty(len(items))
    for ids, _, out in _outputs(model, objective, items, runtime):
        scores[ids] = out[: len(ids), 0].float().cpu()
    return scores.tolist()


def eval_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: sorted by length (least padding); order does not change metrics."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _outputs(
    model: Any, objective: Any, items: Sequence[dict[str, Any]], runtime: Runtime, batch_size: int | None = None
) -> Iterator[tuple[list[int], dict[str, torch.Tensor], Any]]:
    """(item indices, batch on the device, model output) for length-sorted batches, in eval mode."""
    lengths = [objective.length(it) for it in items]
    for ids in eval_batches(lengths, batch_size or runtime.eval_batch_size):
        batch = {k: v.to(runtime.device) for k, v in objective.collate([items[i] for i in ids]).items()}
        with runtime.autocast():
            output = _forward(model, objective, batch)
        yield ids, batch, output  # outside autocast: metrics are computed as before


def _forward(model: Any, objective: Any, batch: dict[str, torch.Tensor]) -> Any:
    was_training = model.training
    model.eval()
    try:
        return model(**objective.model_inputs(batch))
    finally:
        model.train(was_training)
