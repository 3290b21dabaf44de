"""Sequence classification: cross-entropy over a new head; accuracy, macro-F1, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.data.records import Example
from tunesmith.eval.metrics import ConfusionMetrics
from tunesmith.training.cache import cache_text_items

__all__ = ["ClassificationObjective", "Item"]

# One tokenised example: input_ids (and token_type_ids) as lists and a label index; or, once cached
# (training/cache.py), pooled `features` (H,) or token states `hidden` (T, H) with their `start_block`.
Item = dict[str, Any]

PAD_MULTIPLE = 8


class ClassificationObjective:
    name = "classification"
    default_metric = "accuracy"

    def __init__(self, tokenizer: Any, labels: Sequence[str], max_length: int) -> None:
        self.tokenizer = tokenizer
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.max_length = max_length
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(
        self, examples: Sequence[Example], split: str = "train", pack_rows: bool = False, chunk: int = 1024
    ) -> list[Item]:
        """Tokenise examples (truncated to max_length) into items the collate step pads.
        (`split` and `pack_rows` are part of the objective protocol; classification rows are not packed.)"""
        items: list[Item] = []
        for start in range(0, len(examples), chunk):
            part = examples[start : start + chunk]
            pairs = [e.text_pair for e in part] if part and part[0].text_pair is not None else None
            enc = self.tokenizer(
                [e.text for e in part], pairs, truncation=True, max_length=self.max_length, padding=False
            )
            for i, example in enumerate(part):
                item: Item = {"input_ids": enc["input_ids"][i]}
                if pairs is not None and "token_type_ids" in enc:
                    item["token_type_ids"] = enc["token_type_ids"][i]
                item["label"] = self.index[example.label] if example.label is not None else -1
                items.append(item)
        return items

    @staticmethod
    def length(item: Item) -> int:
        if "input_ids" in item:
            return len(item["input_ids"])
        return len(item["hidden"]) if "hidden" in item else 1

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Pad a list of items to the longest one: input_ids/attention_mask (B, T), labels (B,)."""
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if "features" in items[0]:
            return {"features": torch.stack([it["features"] for it in items]), "labels": labels}
        if "hidden" in items[0]:
            return self._collate_hidden(items, labels)
        width = self.padded_width(max(len(it["input_ids"]) for it in items))
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            ids[row, : len(it["input_ids"])] = torch.tensor(it["input_ids"])
            mask[row, : len(it["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "token_type_ids" in items[0]:
            types = torch.zeros_like(ids)
            for row, it in enumerate(items):
                types[row, : len(it["token_type_ids"])] = torch.tensor(it["token_type_ids"])
            batch["token_type_ids"] = types
        return batch

    def _collate_hidden(self, items: Sequence[Item], labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Cached token states zero-padded as token ids are: hidden (B, T, H), attention_mask (B, T).

        The same width as uncached batches gives the blocks above the same shapes, so their dropout
        draws the same masks and a cached run trains exactly as an uncached one.
        """
        start = {it["start_block"] for it in items}
        assert len(start) == 1, f"one batch mixes states cached at blocks {sorted(start)}"
        width = self.padded_width(max(len(it["hidden"]) for it in items))
        hidden = torch.zeros((len(items), width, items[0]["hidden"].shape[1]), dtype=items[0]["hidden"].dtype)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, it in enumerate(items):
            hidden[row, : len(it["hidden"])] = it["hidden"]
            mask[row, : len(it["hidden"])] = 1
        # A 0-d tensor, so the batch stays a dict of tensors that moves to the device as a whole.
        return {"hidden": hidden, "attention_mask": mask, "start_block": torch.tensor(start.pop()), "labels": labels}

    def padded_width(self, longest: int) -> int:
        """Pad to a multiple of PAD_MULTIPLE (never past max_length).

        Fewer distinct shapes let the CPU matmul library (oneDNN) reuse its cached kernels and
        buffers: with one shape per length, its cache grew peak memory by ~25% in a LoRA run.
        """
        rounded = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
        return min(rounded, max(longest, self.max_length))

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    @staticmethod
    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    @staticmethod
    def eval_samples(model: Any, autocast: Any, max_new_tokens: int) -> list[dict[str, str]]:
        return []  # nothing is generated for a classifier

    def new_metrics(self) -> ConfusionMetrics:
        return ConfusionMetrics(self.labels)

    # Frozen work done once, as items with cached states in place of token ids (training/cache.py).
    cache_frozen = cache_text_items
