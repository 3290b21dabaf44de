"""Reward modelling: a scalar score per (prompt, response), trained so that the preferred response
of each pair scores higher (the pairwise Bradley-Terry loss of InstructGPT, Ouyang et al. 2022).

The model is a text classifier with one output: an encoder reads `[CLS] prompt [SEP] response`
(pooled as `model.pooling` says), a decoder reads the prompt and response as its chat template
renders them (pool with `model.pooling: last`). A batch holds the B chosen responses, then the B
rejected ones, so one forward pass scores both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tunesmith.config import DataConfig
from tunesmith.data.load import read_preference_examples
from tunesmith.data.preferences import PreferenceExample, encode_pairs
from tunesmith.data.quality import QualityReport
from tunesmith.data.quality.pairs import check_pair_file
from tunesmith.data.sft import Message
from tunesmith.eval.evaluate import score_items
from tunesmith.eval.metrics import PreferenceMetrics
from tunesmith.losses.preference import reward_loss
from tunesmith.models.load import build_classifier
from tunesmith.registry import register_task
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseObjective, BaseTask
from tunesmith.training.batching import PAD_MULTIPLE

__all__ = ["RewardObjective", "RewardTask"]

Item = dict[str, Any]


@register_task("reward")
class RewardTask(BaseTask):
    """(Prompt, response) -> a score, learned from preference pairs."""

    name = "reward"
    summary = "a scalar score learned from preference pairs"
    headline = ("accuracy", "margin")
    output = "score"
    retention_metrics = ("accuracy",)

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[PreferenceExample]:
        return read_preference_examples(source, data)

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        return check_pair_file(source, references, data, self.name)

    def build_model(self, num_labels: int) -> nn.Module:
        return build_classifier(self.cfg.model, 1, self.cfg.train.seed)  # one output: the score

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> RewardObjective:
        return RewardObjective(tokenizer, self.cfg.data.max_length, self.cfg.data.overlong)

    def score(self, trained: Any, prompts: list[str], responses: list[str], runtime: Runtime) -> list[float]:
        items = trained.objective.encode_responses(prompts, responses)
        return score_items(trained.model, trained.objective, items, runtime)


class RewardObjective(BaseObjective):
    default_metric = "accuracy"
    rows_per_item = 2  # the chosen and the rejected response

    def __init__(self, tokenizer: Any, max_length: int, overlong: str = "truncate") -> None:
        super().__init__(tokenizer)
        self.max_length = max_length
        self.overlong = overlong
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode(
        self, examples: Sequence[PreferenceExample], split: str = "train", pack_rows: bool = False
    ) -> list[Item]:
        """Token ids of both sides of each pair: `{"chosen": ids, "rejected": ids}`."""
        if getattr(self.tokenizer, "chat_template", None):
            pairs, counts = encode_pairs(examples, self.tokenizer, "chat", self.max_length, self.overlong)  # type: ignore[arg-type]
            self.counts[split] = counts
            return [{"chosen": c.input_ids, "rejected": r.input_ids} for c, r in pairs]
        self.counts[split] = {"rows": len(examples), "kept": len(examples)}
        prompts = [_prompt_text(e) for e in examples]
        items: list[Item] = [{} for _ in examples]
        for side in ("chosen", "rejected"):
            responses = [getattr(e, side) for e in examples]
            enc = self.tokenizer(prompts, responses, truncation=True, max_length=self.max_length)
            for item, ids in zip(items, enc["input_ids"], strict=True):
                item[side] = ids
        return items

    def encode_responses(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Item]:
        """Items that score one response to one prompt each (both sides of the item are that response)."""
        pairs = [
            PreferenceExample((Message("user", p),), r, r, "prompt", f"input {i + 1}")
            for i, (p, r) in enumerate(zip(prompts, responses, strict=True))
        ]
        return self.encode(pairs, "score")

    @staticmethod
    def length(item: Item) -> int:
        return max(len(item["chosen"]), len(item["rejected"]))

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """input_ids/attention_mask (2B, T): the chosen responses, then the rejected ones."""
        rows = [it["chosen"] for it in items] + [it["rejected"] for it in items]
        width = -(-max(len(r) for r in rows) // PAD_MULTIPLE) * PAD_MULTIPLE
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, tokens in enumerate(rows):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.zeros(len(items), dtype=torch.long)}

    @staticmethod
    def loss(scores: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = scores[:, 0].float().chunk(2)
        return reward_loss(chosen, rejected)

    def new_metrics(self) -> PreferenceMetrics:
        return PreferenceMetrics()  # (both sides of a pair run through the model at every step: nothing cached)


def _prompt_text(example: PreferenceExample) -> str:
    """The prompt as one text for an encoder: the message itself, or each turn as `role: content`."""
    if len(example.prompt) == 1:
        return example.prompt[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in example.prompt)
