"""The objective of instruction tuning: next-token loss on completion tokens.

Rows are rendered and masked by data/templates.py (what is trained: completion / assistant tokens
and the EOS). Here they are batched, optionally packed several to a sequence (each row attends only
to itself and its positions restart, so a packed row computes what it computes alone), and scored
with the chunked loss of losses/lm.py on the trained positions only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from tunesmith.data.sft import SftExample
from tunesmith.data.templates import encode_examples, resolve_template
from tunesmith.eval.answers import answer_prompts
from tunesmith.losses.lm import IGNORE, linear_cross_entropy, token_losses
from tunesmith.models.causal_lm import LMOutput
from tunesmith.models.generate import Sampling
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseObjective
from tunesmith.training.batching import padded_width
from tunesmith.training.cache import cache_text_items

__all__ = ["LMMetrics", "SftObjective", "pack"]

Item = dict[str, Any]


class SftObjective(BaseObjective):
    default_metric = "loss"

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        template: str = "auto",
        train_on_prompt: bool = False,
        overlong: str = "truncate",
        packing: bool = False,
    ) -> None:
        super().__init__(tokenizer)  # instruction rows have no label set
        self.max_length = max_length
        self.template = template
        self.train_on_prompt = train_on_prompt
        self.overlong = overlong
        self.packing = packing
        # Padding is masked by the attention mask, never by id, so any id will do (pad may equal EOS).
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.sample_prompts: list[Any] = []  # validation prompts generated at each evaluation

    def resolved_template(self) -> str:
        """'chat' or 'plain': how prompts are rendered, in training and at inference alike."""
        return resolve_template(self.tokenizer, self.template)  # type: ignore[arg-type]

    def eval_samples(self, model: Any, runtime: Runtime, max_new_tokens: int) -> list[dict[str, Any]]:
        """Greedy answers to the fixed validation prompts, so a log shows behaviour, not only loss."""
        if not self.sample_prompts:
            return []
        template = self.resolved_template()
        outputs = answer_prompts(
            model, self.tokenizer, template, self.sample_prompts, Sampling(max_new_tokens), 8, runtime.autocast
        )
        return [{"prompt": p[-1].content, "output": o} for p, o in zip(self.sample_prompts, outputs, strict=True)]

    def encode(self, examples: Sequence[SftExample], split: str = "train", pack_rows: bool = False) -> list[Item]:
        """Token ids and trained-token flags per row (counts of truncated/dropped rows kept in `counts`)."""
        encoded, counts = encode_examples(
            examples,
            self.tokenizer,
            self.template,  # type: ignore[arg-type]
            self.train_on_prompt,
            self.max_length,
            self.overlong,  # type: ignore[arg-type]
        )
        items: list[Item] = [{"input_ids": e.input_ids, "targets": e.targets} for e in encoded]
        if pack_rows and self.packing:
            items = pack(items, self.max_length)
            counts["packed_sequences"] = len(items)
        self.counts[split] = counts
        return items

    @staticmethod
    def length(item: Item) -> int:
        return len(item["input_ids"])

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Right-padded ids (B, T), labels (B, T) = the next token where it is trained, else IGNORE;
        an attention mask (B, T), or for packed rows an additive (B, 1, T, T) block-diagonal causal
        mask and position ids that restart at every row."""
        width = padded_width(max(len(it["input_ids"]) for it in items), self.max_length)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        for row, it in enumerate(items):
            x = torch.tensor(it["input_ids"])
            trained = torch.tensor(it["targets"], dtype=torch.bool)
            ids[row, : len(x)] = x
            # Position t predicts token t + 1.
            labels[row, : len(x) - 1] = torch.where(trained[1:], x[1:], IGNORE)
        batch = {"input_ids": ids, "labels": labels}
        if any("segments" in it for it in items):
            batch.update(_packed_mask(items, width))
        else:
            mask = torch.zeros((len(items), width), dtype=torch.long)
            for row, it in enumerate(items):
                mask[row, : len(it["input_ids"])] = 1
            batch["attention_mask"] = mask
        return batch

    @staticmethod
    def loss(output: LMOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean next-token cross-entropy over the trained positions of the batch."""
        trained = batch["labels"] != IGNORE  # (B, T)
        return linear_cross_entropy(output.hidden[trained], output.weight, batch["labels"][trained], output.chunk)

    # Frozen work done once, as items with cached states in place of token ids (training/cache.py).
    cache_frozen = cache_text_items

    def new_metrics(self) -> LMMetrics:
        return LMMetrics()


class LMMetrics:
    """Mean token loss, perplexity and next-token accuracy over the trained positions."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0
        self.correct = 0

    def update_batch(self, output: LMOutput, batch: dict[str, torch.Tensor]) -> None:
        self.update(output, batch["labels"])

    def update(self, output: LMOutput, labels: torch.Tensor) -> None:
        trained = labels != IGNORE
        losses, correct = token_losses(output.hidden[trained], output.weight, labels[trained], output.chunk)
        self.loss_sum += float(losses.sum())
        self.tokens += int(losses.numel())
        self.correct += int(correct.sum())

    def compute(self) -> dict[str, Any]:
        loss = self.loss_sum / max(self.tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": self.correct / max(self.tokens, 1),
            "tokens": self.tokens,
        }


def pack(items: Sequence[Item], max_length: int) -> list[Item]:
    """Rows packed into sequences of at most `max_length` tokens (first fit, longest first).

    Each packed item keeps its rows' ids and flags end to end and their lengths in `segments`;
    the order is deterministic, so a resumed run packs exactly as the interrupted one did.
    """
    order = sorted(range(len(items)), key=lambda i: -len(items[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(items[i]["input_ids"])
        slot = next((b for b, free in enumerate(room) if free >= n), None)
        if slot is None:
            bins.append([i])
            room.append(max_length - n)
        else:
            bins[slot].append(i)
            room[slot] -= n
    packed = []
    for members in bins:
        packed.append(
            {
                "input_ids": [t for i in members for t in items[i]["input_ids"]],
                "targets": [t for i in members for t in items[i]["targets"]],
                "segments": [len(items[i]["input_ids"]) for i in members],
            }
        )
    return packed


def _packed_mask(items: Sequence[Item], width: int) -> dict[str, torch.Tensor]:
    segment = torch.full((len(items), width), -1, dtype=torch.long)  # -1: padding
    positions = torch.zeros((len(items), width), dtype=torch.long)
    for row, it in enumerate(items):
        start = 0
        for s, n in enumerate(it.get("segments", [len(it["input_ids"])])):
            segment[row, start : start + n] = s
            positions[row, start : start + n] = torch.arange(n)
            start += n
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    real = segment[:, :, None] >= 0
    # Padding attends to itself only, so no row of the mask is empty (an empty row gives NaN).
    allowed = (same & real & causal) | torch.eye(width, dtype=torch.bool)
    # Additive form: both attention kernels accept it ("eager" misreads a boolean 4-D mask).
    mask = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return {"attention_mask": mask[:, None], "position_ids": positions}
