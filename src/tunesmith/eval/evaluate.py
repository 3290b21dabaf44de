"""Streamed evaluation: batches through the model, metrics updated per batch (no logits kept)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tunesmith.training.batching import eval_batches

__all__ = ["evaluate_items", "predict_items", "score_items"]


@torch.no_grad()
def evaluate_items(
    model: Any,
    objective: Any,
    items: Sequence[dict[str, Any]],
    batch_size: int,
    autocast: Callable[[], Any],
    device: torch.device,
) -> dict[str, Any]:
    """Metrics of `model` over labelled `items` (model left in the mode it was in)."""
    metrics = objective.new_metrics()
    for _, batch, logits in _outputs(model, objective, items, batch_size, autocast, device):
        metrics.update_batch(logits, batch)
    return metrics.compute()  # type: ignore[no-any-return]


@torch.no_grad()
def predict_items(
    model: Any,
    objective: Any,
    items: Sequence[dict[str, Any]],
    batch_size: int,
    autocast: Callable[[], Any],
    device: torch.device,
) -> torch.Tensor:
    """Class probabilities (N, C) in input order."""
    probs = torch.empty((len(items), len(objective.labels)))
    for ids, _, logits in _outputs(model, objective, items, batch_size, autocast, device):
        probs[ids] = logits.float().softmax(-1).cpu()
    return probs


@torch.no_grad()
def score_items(
    model: Any,
    objective: Any,
    items: Sequence[dict[str, Any]],
    batch_size: int,
    autocast: Callable[[], Any],
    device: torch.device,
) -> list[float]:
    """A reward model's scores of items in input order (each item scores one response, held twice)."""
    scores = torch.empty(len(items))
    for ids, _, out in _outputs(model, objective, items, batch_size, autocast, device):
        scores[ids] = out[: len(ids), 0].float().cpu()
    return scores.tolist()


def _outputs(model: Any, objective: Any, items: Sequence[dict[str, Any]], batch_size: int, autocast, device):
    """(item indices, batch on the device, model output) for length-sorted batches, in eval mode."""
    lengths = [objective.length(it) for it in items]
    for ids in eval_batches(lengths, batch_size):
        batch = {k: v.to(device) for k, v in objective.collate([items[i] for i in ids]).items()}
        with autocast():
            output = _forward(model, objective, batch)
        yield ids, batch, output  # outside autocast: metrics are computed as before


def _forward(model: Any, objective: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    was_training = model.training
    model.eval()
    try:
        return model(**objective.model_inputs(batch))  # type: ignore[no-any-return]
    finally:
        model.train(was_training)
