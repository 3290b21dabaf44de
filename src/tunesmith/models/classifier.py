"""A text classifier: a pre-trained encoder, a pooling step, and a new linear head.

The head is new ("modify the output layer"): sized to the task's labels, seeded, trained by every
method. Keeping pooling and head outside the backbone lets a frozen backbone's pooled features be
computed once and cached (train/cache.py), and lets peft wrap the backbone alone.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

__all__ = ["TextClassifier"]


class TextClassifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int,
        num_labels: int,
        pooling: Literal["mean", "cls"] = "mean",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Pooled features (B, H) of a batch of token ids (B, T)."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state  # (B, T', H)
        # Prompt tuning prepends virtual tokens: pool over the real positions only.
        hidden = hidden[:, -input_ids.shape[1] :]  # (B, T, H)
        return pool(hidden, attention_mask, self.pooling)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, num_labels) from token ids, or from cached pooled `features` (B, H)."""
        if features is None:
            assert input_ids is not None and attention_mask is not None
            features = self.encode(input_ids, attention_mask, token_type_ids)
        return self.head(self.dropout(features.to(self.head.weight.dtype)))


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) token states and a (B, T) mask -> (B, H)."""
    if how == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
