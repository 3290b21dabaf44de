"""Text classification: a text (or text pair) -> one of a set of labels, through a new head on a
pre-trained encoder (pooled token states); cross-entropy; accuracy, macro-F1, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config import DataConfig
from tunesmith.data.load import read_examples
from tunesmith.data.quality import Finding, Measure, QualityReport, RowFacts, Scan, check_file, clean_file, row_problem
from tunesmith.data.quality import findings as checks
from tunesmith.data.readers import Row
from tunesmith.data.records import Example, to_examples
from tunesmith.errors import DataError
from tunesmith.eval.evaluate import predict_items
from tunesmith.eval.metrics import ConfusionMetrics
from tunesmith.models.load import build_classifier
from tunesmith.registry import register_task
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseObjective, BaseTask, label_rows
from tunesmith.training.batching import padded_width
from tunesmith.training.cache import cache_text_items

__all__ = ["ClassificationObjective", "ClassificationRows", "ClassificationTask"]

# One tokenised example: input_ids (and token_type_ids) as lists and a label index; or, once cached
# (training/cache.py), pooled `features` (H,) or token states `hidden` (T, H) with their `start_block`.
Item = dict[str, Any]


@register_task("classification")
class ClassificationTask(BaseTask):
    """Text -> label: a new head on a pre-trained encoder."""

    name = "classification"
    summary = "text -> label"
    headline = ("accuracy", "macro_f1")
    labelled = True
    output = "label"
    retention_metrics = ("accuracy",)

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[Example]:
        return read_examples(source, data, require_labels=targets)

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        return check_file(source, data, ClassificationRows(data), tokenizer, references)

    def clean_data(
        self, source: str, out: Path, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        return clean_file(source, out, data, ClassificationRows(data), tokenizer, references)

    def build_model(self, num_labels: int) -> nn.Module:
        return build_classifier(self.cfg.model, num_labels, self.cfg.train.seed)

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> ClassificationObjective:
        return ClassificationObjective(tokenizer, labels, self.cfg.data.max_length)

    def predict(self, trained: Any, inputs: list[str] | None, data: str | None, runtime: Runtime) -> list[dict]:
        if data is not None:
            examples = read_examples(data, trained.config.data, require_labels=False)
        else:
            examples = [Example(text=t, label=None) for t in inputs or []]
        objective = trained.objective
        probs = predict_items(trained.model, objective, objective.encode(examples), runtime)
        return label_rows(examples, probs, objective.labels, lambda e: {"text": e.text})


class ClassificationRows:
    """The streamed gate's view of labelled text rows: a row is its text (and pair) and a label;
    lengths are the tokens the classifier sees; a text under two labels is a conflict."""

    task = "classification"
    labelled = True
    tallies: tuple[str, ...] = ()

    def __init__(self, data: DataConfig) -> None:
        self.data = data

    def inspect(self, row: Row) -> RowFacts:
        d = self.data
        for field in (d.text_field, d.text_pair_field):
            value = row.data.get(field) if field else None
            if isinstance(value, str) and not value.strip():
                hint = " (whitespace only)" if value else ""
                return RowFacts("empty", problem=f"empty {field!r}{hint}; write it or remove the row")
        try:
            (ex,) = to_examples([row], d.text_field, d.label_field, d.text_pair_field, d.label_map)
        except DataError as e:
            return RowFacts("schema_error", problem=row_problem(str(e), row.where))
        compared = ex.text if ex.text_pair is None else f"{ex.text}\n\x00\n{ex.text_pair}"
        return RowFacts("ok", text=compared, label=ex.label, example=ex)

    def measure(self, facts: Sequence[RowFacts], tokenizer: Any | None) -> list[Measure]:
        """Tokens of each text (with its pair and the special tokens), or words without a tokenizer."""
        texts = [f.example.text for f in facts]
        pairs = [f.example.text_pair for f in facts]
        if tokenizer is None or not texts:
            return [Measure(len(t.split()) + len((p or "").split())) for t, p in zip(texts, pairs, strict=True)]
        if any(pair is not None for pair in pairs):
            encoded = tokenizer(texts, [pair or "" for pair in pairs], add_special_tokens=True)
        else:
            encoded = tokenizer(texts, add_special_tokens=True)
        return [Measure(len(ids)) for ids in encoded["input_ids"]]

    def findings(self, scan: Scan) -> tuple[Finding, ...]:
        return (checks.conflicting(scan), checks.leakage(scan), checks.label_balance(scan), checks.overlong(scan))


class ClassificationObjective(BaseObjective):
    default_metric = "accuracy"

    def __init__(self, tokenizer: Any, labels: Sequence[str], max_length: int) -> None:
        super().__init__(tokenizer, labels)  # nothing is counted: rows are truncated to max_length
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
        """See `training.batching.padded_width`."""
        return padded_width(longest, self.max_length)

    @staticmethod
    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def new_metrics(self) -> ConfusionMetrics:
        return ConfusionMetrics(self.labels)

    # Frozen work done once, as items with cached states in place of token ids (training/cache.py).
    cache_frozen = cache_text_items
