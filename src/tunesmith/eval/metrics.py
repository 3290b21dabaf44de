"""Streaming metrics: updated batch by batch, so evaluation never holds all logits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.losses.preference import reward_loss

__all__ = ["ConfusionMetrics", "PreferenceMetrics", "higher_is_better"]


def higher_is_better(metric: str) -> bool:
    return metric not in ("loss", "perplexity")


class ConfusionMetrics:
    """Accuracy, macro-F1, per-class F1, mean loss, the confusion matrix (rows: true label) and, with
    `top_k`, the share of rows whose label is among the k highest logits."""

    def __init__(self, labels: Sequence[str], top_k: int | None = None) -> None:
        self.labels = list(labels)
        # Top-k accuracy is reported only where it says something: with more than k classes.
        self.top_k = top_k if top_k is not None and len(self.labels) > top_k else None
        self.top_k_hits = 0
        self.matrix = torch.zeros((len(labels), len(labels)), dtype=torch.long)
        self.loss_sum = 0.0
        self.count = 0

    def update_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        self.update(logits, batch["labels"])

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: logits (B, C), labels (B,) with -1 for unlabelled rows (skipped)."""
        keep = labels >= 0
        if not bool(keep.any()):
            return
        logits, labels = logits[keep].float().cpu(), labels[keep].cpu()  # the counts live on the CPU
        self.loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        preds = logits.argmax(-1)
        if self.top_k is not None:
            top = logits.topk(self.top_k, dim=-1).indices  # (B, k)
            self.top_k_hits += int((top == labels[:, None]).any(-1).sum())
        flat = labels * len(self.labels) + preds
        self.matrix += torch.bincount(flat, minlength=self.matrix.numel()).view_as(self.matrix)
        self.count += int(labels.numel())

    def compute(self) -> dict[str, Any]:
        m = self.matrix.double()
        tp = m.diag()
        precision = tp / m.sum(0).clamp(min=1)
        recall = tp / m.sum(1).clamp(min=1)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
        present = m.sum(1) > 0
        top_k = {f"top{self.top_k}_accuracy": self.top_k_hits / max(self.count, 1)} if self.top_k else {}
        return {
            "accuracy": float(tp.sum() / max(self.count, 1)),
            **top_k,
            "macro_f1": float(f1[present].mean()) if bool(present.any()) else 0.0,
            "loss": self.loss_sum / max(self.count, 1),
            "count": self.count,
            "f1_per_class": {label: float(f1[i]) for i, label in enumerate(self.labels)},
            "confusion": {"labels": self.labels, "matrix": self.matrix.tolist()},
        }


class PreferenceMetrics:
    """Preference accuracy (the chosen response scores higher), mean margin, mean scores and loss."""

    def __init__(self) -> None:
        self.count = 0
        self.correct = 0
        self.sums = {"margin": 0.0, "chosen": 0.0, "rejected": 0.0, "loss": 0.0}

    def update_batch(self, scores: Any, batch: dict[str, torch.Tensor]) -> None:
        """A reward model's scores (2B, 1) of B chosen responses, then B rejected ones."""
        chosen, rejected = scores[:, 0].float().cpu().chunk(2)
        self.add(chosen, rejected, float(reward_loss(chosen, rejected)) * len(chosen))

    def add(self, chosen: torch.Tensor, rejected: torch.Tensor, loss_sum: float) -> None:
        """Count a batch of pairs by their scores (or implicit rewards) and summed loss."""
        self.count += len(chosen)
        self.correct += int((chosen > rejected).sum())
        self.sums["margin"] += float((chosen - rejected).sum())
        self.sums["chosen"] += float(chosen.sum())
        self.sums["rejected"] += float(rejected.sum())
        self.sums["loss"] += loss_sum

    def compute(self) -> dict[str, Any]:
        n = max(self.count, 1)
        return {
            "accuracy": self.correct / n,
            "margin": self.sums["margin"] / n,
            "chosen": self.sums["chosen"] / n,
            "rejected": self.sums["rejected"] / n,
            "loss": self.sums["loss"] / n,
            "count": self.count,
        }
