"""The objective of reinforcement learning from a reward: for each prompt, sample a group of
completions, score them, and raise the log-probability of the completions that beat their group
(group-relative policy gradient: GRPO, Shao et al. 2024, or RLOO, Ahmadian et al. 2024), with a
per-token KL penalty towards the base model (the k3 estimator).

It runs on the one training loop: the items are prompts, and building a batch samples the
completions (batched, with a KV cache), scores them, computes their advantages and the reference
model's log-probabilities; the loop's forward and backward pass then score the completions under
the policy. The reference is the base model: the policy with its peft adapter switched off, or a
frozen copy for methods that cannot switch off (full, partial, bottleneck adapters).
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch

from tunesmith.data.sft import SftExample
from tunesmith.data.templates import encode_prompt, resolve_template
from tunesmith.losses.lm import IGNORE, token_logprobs
from tunesmith.losses.preference import group_advantages, kl_k3, sequence_sums
from tunesmith.models.anatomy import adapters_off, can_switch_off
from tunesmith.models.causal_lm import LMOutput
from tunesmith.models.generate import Sampling, generate_ids
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseObjective
from tunesmith.tasks.rl.rewards import Reward, RewardSource
from tunesmith.training.batching import padded_width

__all__ = ["RlMetrics", "RlObjective"]

Item = dict[str, Any]


class RlObjective(BaseObjective):
    default_metric = "reward"
    samples_while_training = True

    def __init__(self, tokenizer: Any, max_length: int, cfg: Any, reward: Reward, template: str = "auto") -> None:
        super().__init__(tokenizer)
        self.max_length = max_length
        self.cfg = cfg
        self.reward = reward
        self.score: RewardSource | None = None  # the reward, bound to the run's runtime
        self.template = template
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.model: Any = None
        self.reference: Any = None
        self.runtime: Runtime | None = None
        self.invalid_rewards = 0  # completions whose reward was not a finite number (left out)
        self.last: dict[str, float] = {}
        self.last_samples: list[dict[str, Any]] = []  # a few completions of the last batch, logged at evaluations

    def bind(self, model: Any, runtime: Runtime) -> None:
        """The policy that samples, the reward scoring on `runtime`, and the reference: the policy with
        its adapter off where it can switch it off, else a frozen copy of the model as it starts."""
        self.model, self.runtime, self.score = model, runtime, self.reward.bind(runtime)
        if not can_switch_off(model):
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)

    def encode(self, examples: Sequence[SftExample], split: str = "train", pack_rows: bool = False) -> list[Item]:
        """The prompt of each row as the ids generation starts from (a completion, if any, is unused)."""
        template = resolve_template(self.tokenizer, self.template)  # type: ignore[arg-type]
        items = []
        for example in examples:
            messages = tuple(m for m in example.messages if m.role != "assistant") or example.messages
            prompt = messages if example.kind == "chat" else messages[-1].content
            items.append(
                {"prompt_ids": encode_prompt(prompt, self.tokenizer, template), "prompt": messages[-1].content}
            )
        self.counts[split] = {"rows": len(examples), "kept": len(items)}
        return items

    @staticmethod
    def length(item: Item) -> int:
        return len(item["prompt_ids"])

    @property
    def rows_per_item(self) -> int:  # type: ignore[override]
        """A training pass runs every sample of each prompt."""
        return int(self.cfg.group_size)

    def row_length(self, item: Item) -> int:
        """A sampled row's length at most: the prompt and `max_new_tokens` of completion."""
        return len(item["prompt_ids"]) + int(self.cfg.max_new_tokens)

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Sample `group_size` completions per prompt, score them, and lay out (P*G, T) rows: ids,
        attention mask, labels on completion tokens, the reference's per-token log-probabilities,
        advantages and rewards (P*G,), and which rows have a valid reward."""
        assert self.model is not None and self.runtime is not None, "bind(...) before building RL batches"
        g = self.cfg.group_size
        prompts = [it["prompt_ids"] for it in items for _ in range(g)]
        seed = int(torch.randint(0, 2**31 - 1, (1,)))  # from the global generator: checkpointed, so resumes match
        sampling = Sampling(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p, seed)
        with self.runtime.autocast():
            completions = generate_ids(
                self.model, prompts, self.model.eos_ids or [self.tokenizer.eos_token_id], sampling, self.pad_id
            )
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        prompt_texts = [it["prompt"] for it in items for _ in range(g)]
        rewards = self._rewards(prompt_texts, texts)
        self.last_samples = [
            {"prompt": p, "output": t, "reward": float(r)}
            for p, t, r in list(zip(prompt_texts, texts, rewards.tolist(), strict=True))[:g]
        ]
        valid = torch.isfinite(rewards)
        self.invalid_rewards += int((~valid).sum())
        advantages = group_advantages(torch.where(valid, rewards, 0.0), g, self.cfg.advantage)
        batch = self._rows(prompts, completions)
        batch.update(advantages=advantages, rewards=torch.where(valid, rewards, 0.0), valid=valid.float())
        batch["reference"] = self._reference_logps(batch)
        return batch

    def _rewards(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        """One reward per completion; NaN where the function failed or gave no finite number."""
        assert self.score is not None, "bind(...) before scoring"
        try:
            values = [float(v) for v in self.score(prompts, completions)]
        except Exception as exc:  # a user's function: any failure skips this step, counted and logged
            self.last["reward_error"] = 1.0
            print(f"warning: rl.reward raised {type(exc).__name__}: {exc}; the step is skipped", file=sys.stderr)
            return torch.full((len(completions),), math.nan)
        if len(values) != len(completions):
            print(
                f"warning: rl.reward gave {len(values)} scores for {len(completions)} completions; the step is skipped"
            )
            return torch.full((len(completions),), math.nan)
        return torch.tensor(values, dtype=torch.float32)

    def _rows(self, prompts: list[Sequence[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        rows = [
            (list(p) + c)[: self.max_length + self.cfg.max_new_tokens]
            for p, c in zip(prompts, completions, strict=True)
        ]
        width = padded_width(max(len(r) for r in rows), self.max_length + self.cfg.max_new_tokens)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for row, (tokens, prompt) in enumerate(zip(rows, prompts, strict=True)):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
            # Position t predicts token t + 1: the completion's tokens are the targets.
            start = len(prompt) - 1
            labels[row, start : len(tokens) - 1] = ids[row, start + 1 : len(tokens)]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    @torch.no_grad()
    def _reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The base model's log-probability of every scored token (N,), in the order `loss` reads them."""
        assert self.runtime is not None
        model = self.reference if self.reference is not None else self.model
        device = next(model.parameters()).device
        inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
        was_training = model.training
        model.eval()
        try:
            with adapters_off(model), self.runtime.autocast():
                output = model(**inputs)
                scored = batch["labels"].to(device) != IGNORE
                labels = batch["labels"].to(device)[scored]
                values = token_logprobs(output.hidden[scored], output.weight, labels, output.chunk)
        finally:
            model.train(was_training)
        padded = torch.zeros(batch["labels"].shape, dtype=torch.float32)
        padded[batch["labels"] != IGNORE] = values.float().cpu()
        return padded

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def terms(
        self, output: LMOutput, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row policy-gradient term, KL (mean over each completion's tokens) and completion length."""
        scored = (batch["labels"] != IGNORE) & (batch["valid"][:, None] > 0)  # (R, T)
        rows = scored.nonzero()[:, 0]
        logp = token_logprobs(output.hidden[scored], output.weight, batch["labels"][scored], output.chunk)  # (N,)
        kl = kl_k3(logp, batch["reference"][scored])
        # On-policy, the ratio pi / pi_old is 1 with gradient grad log pi (GRPO's surrogate at one update).
        ratio = torch.exp(logp - logp.detach())
        per_token = -batch["advantages"][rows] * ratio + self.cfg.kl_coef * kl
        lengths = scored.sum(1).clamp(min=1).float()
        n = scored.shape[0]
        return sequence_sums(per_token, rows, n) / lengths, sequence_sums(kl.detach(), rows, n) / lengths, scored.sum(1)

    def loss(self, output: LMOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean over valid completions of their per-token mean objective; NaN when no completion of the
        batch has a valid reward, which makes the loop skip the step (counted, weights untouched)."""
        valid = batch["valid"] > 0
        per_row, kl, lengths = self.terms(output, batch)
        if not bool(valid.any()):
            return per_row.sum() * math.nan
        self.last = {
            "reward": float(batch["rewards"][valid].mean()),
            "kl": float(kl[valid].mean()),
            "completion_tokens": float(lengths[valid].float().mean()),
        }
        return per_row[valid].mean()

    def step_stats(self) -> dict[str, float]:
        """Mean reward, KL and completion length of the last training batch (logged with the loss)."""
        return {**self.last, "invalid_rewards": float(self.invalid_rewards)}

    def eval_samples(self, model: Any, runtime: Runtime, max_new_tokens: int) -> list[dict[str, Any]]:
        """The group of completions of the first prompt of the last batch, with their rewards."""
        return self.last_samples

    def new_metrics(self) -> RlMetrics:
        return RlMetrics(self)


class RlMetrics:
    """Mean reward, KL to the base model and completion length over sampled validation completions."""

    def __init__(self, objective: RlObjective) -> None:
        self.objective = objective
        self.sums = {"reward": 0.0, "kl": 0.0, "completion_tokens": 0.0}
        self.count = 0

    def update_batch(self, output: LMOutput, batch: dict[str, torch.Tensor]) -> None:
        valid = batch["valid"] > 0
        _, kl, lengths = self.objective.terms(output, batch)
        self.sums["reward"] += float(batch["rewards"][valid].sum())
        self.sums["kl"] += float(kl[valid].sum())
        self.sums["completion_tokens"] += float(lengths[valid].float().sum())
        self.count += int(valid.sum())

    def compute(self) -> dict[str, Any]:
        n = max(self.count, 1)
        return {**{k: v / n for k, v in self.sums.items()}, "count": self.count}
