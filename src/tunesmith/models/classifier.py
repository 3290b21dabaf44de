"""A text classifier: a pre-trained encoder, a pooling step, and a new linear head.

The head is new ("modify the output layer"): sized to the task's labels, seeded, trained by every
method. Keeping pooling and head outside the backbone lets a frozen backbone's pooled features be
computed once and cached (train/cache.py), and lets peft wrap the backbone alone.

A BERT-family backbone can also be split at block k: `encode_prefix` gives the token states that
enter block k, and `forward(hidden=..., start_block=k)` runs blocks k.. and the head on them, so
frozen bottom blocks can run once per run. Both run the backbone's own forward on a view of it
(`_view`) that shares every weight and leaves the model itself untouched.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["TextClassifier"]


class TextClassifier(nn.Module):
    pretrained_lr_scale = 1.0  # a transformer: the methods' default rates are for it (plugins.TaskModel)

    def __init__(
        self,
        backbone: nn.Module,
        hidden_size: int,
        num_labels: int,
        pooling: Literal["mean", "cls", "last"] = "mean",
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

    def can_split(self, k: int) -> bool:
        """Whether the backbone can run from block `k` (1..depth) on given token states.

        True for encoders with an `embeddings` stage feeding one stack of blocks (BERT, RoBERTa,
        DistilBERT); callers still check the split against the full forward before trusting it.
        """
        from tunesmith.errors import ConfigError
        from tunesmith.models.anatomy import find_blocks

        if not isinstance(getattr(self.backbone, "embeddings", None), nn.Module):
            return False
        try:
            _, blocks = find_blocks(self.backbone)
        except ConfigError:
            return False
        return 0 < k <= len(blocks)

    def encode_prefix(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        k: int = 0,
    ) -> torch.Tensor:
        """Token states (B, T, H) after the embeddings and blocks 0..k-1: the input of block `k`."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        # Only blocks 0..k-1 run: their last output is the input of block k. (A model that normalises
        # after its last block would add that step here; callers compare the split with the full forward.)
        prefix = _view(self.backbone, slice(0, k), states_given=False)
        return prefix(**kwargs).last_hidden_state  # type: ignore[no-any-return]

    def encode_suffix(self, hidden: torch.Tensor, attention_mask: torch.Tensor, k: int) -> torch.Tensor:
        """Pooled features (B, H) from the token states (B, T, H) entering block `k`: blocks k.. then pooling."""
        view = _view(self.backbone, slice(k, None), states_given=True)
        out = view(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return pool(out, attention_mask, self.pooling)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        start_block: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Logits (B, num_labels) from token ids, from cached pooled `features` (B, H), or from cached
        token states `hidden` (B, T, H) that enter block `start_block` (with their `attention_mask`)."""
        if features is None and hidden is not None:
            assert attention_mask is not None
            features = self.encode_suffix(hidden, attention_mask, int(start_block))
        elif features is None:
            assert input_ids is not None and attention_mask is not None
            features = self.encode(input_ids, attention_mask, token_type_ids)
        return self.head(self.dropout(features.to(self.head.weight.dtype)))


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, H) token states and a (B, T) mask -> (B, H)."""
    if how == "cls":
        return hidden[:, 0]
    if how == "last":  # right-padded rows: the last real token, which a decoder has read everything before
        last = mask.sum(1).clamp(min=1) - 1  # (B,)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class _GivenStates(nn.Module):
    """Stands in for an embedding stage: returns the token states passed to it as `inputs_embeds`
    (by keyword, as BERT and RoBERTa do, or as the one floating-point argument, as DistilBERT does)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if isinstance(kwargs.get("inputs_embeds"), torch.Tensor):
            return kwargs["inputs_embeds"]
        given = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.is_floating_point()]
        assert len(given) == 1, "expected exactly one floating-point input (the token states)"
        return given[0]


def _view(backbone: nn.Module, blocks: slice, states_given: bool) -> nn.Module:
    """`backbone` running only `blocks` of its block stack, and taking token states in place of its
    embedding stage when `states_given`.

    The view is a shallow copy whose `_modules` dicts are copied along the path to the block stack and
    then edited, so it shares every parameter and buffer while the model itself is never changed. It
    is rebuilt on every call (a few shallow copies): one built once could go stale if a submodule
    of the model were replaced later.
    """
    from tunesmith.models.anatomy import find_blocks

    path, stack = find_blocks(backbone)
    view = _shallow_copy(backbone)
    if states_given:
        view._modules["embeddings"] = _GivenStates()
    parent = view
    *ancestors, leaf = path.split(".")
    for name in ancestors:
        child = _shallow_copy(parent._modules[name])  # type: ignore[arg-type]
        parent._modules[name] = child
        parent = child
    parent._modules[leaf] = stack[blocks]
    return view


def _shallow_copy(module: nn.Module) -> nn.Module:
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone
