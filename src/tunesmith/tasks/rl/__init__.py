"""Reinforcement learning from a reward: prompts -> a causal LM whose sampled completions score
higher under a reward (a finished reward run, or a Python function), held near the base model by a
per-token KL penalty. objective.py samples, scores and computes the update; rewards.py finds the
reward.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import Field
from torch import nn

from tunesmith.config import DataConfig, Section
from tunesmith.data.load import Splits, read_sft_examples
from tunesmith.data.quality import QualityReport, limited
from tunesmith.data.sft import SftExample
from tunesmith.plugins import Item, Method
from tunesmith.registry import register_task
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseTask, build_lm, refuse_head_only
from tunesmith.tasks.rl.objective import RlObjective
from tunesmith.tasks.rl.rewards import load_reward

__all__ = ["RlConfig", "RlTask", "check_prompts"]


class RlConfig(Section):
    """Reinforcement learning from a reward: sample a group of completions per prompt, score them, and
    move towards the better ones of each group, held near the base model by a KL penalty."""

    reward: str | None = Field(
        None,
        description="A finished reward run directory, or module:function taking (prompts, completions), "
        "returning one score per completion.",
    )
    group_size: int = Field(
        4, ge=2, description="Completions sampled per prompt; advantages are relative to the group."
    )
    max_new_tokens: int = Field(32, gt=0, description="Longest completion sampled.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the completions.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass of the completions.")
    kl_coef: float = Field(0.05, ge=0.0, description="Weight of the per-token KL penalty to the base model.")
    advantage: Literal["grpo", "rloo"] = Field(
        "grpo", description="grpo: (r - group mean) / group std; rloo: r - mean of the other completions."
    )


@register_task("rl")
class RlTask(BaseTask):
    """Prompts + a reward -> a causal LM tuned online (GRPO, RLOO)."""

    name = "rl"
    summary = "a causal LM tuned online from a reward"
    section = RlConfig
    headline = ("reward", "kl")
    output = "text"

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[SftExample]:
        return read_sft_examples(source, data, require_completion=False)  # a completion, if any, is unused

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        held = [e for r in references for e in self.read_examples(r, data)]
        return check_prompts(self.read_examples(source, data), held, data, source)

    def check_method(self, method: Method) -> None:
        refuse_head_only(method)

    def build_model(self, num_labels: int) -> nn.Module:
        return build_lm(self.cfg)

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> RlObjective:
        """The objective, with its reward loaded (a reward run's model too; it scores once bound)."""
        rl: RlConfig = self.cfg.section(self.name)
        return RlObjective(tokenizer, self.cfg.data.max_length, rl, load_reward(rl.reward), self.cfg.data.template)

    def prepare(
        self,
        objective: Any,
        model: nn.Module,
        runtime: Runtime,
        splits: Splits,
        train_items: list[Item],
        val_items: list[Item] | None,
    ) -> tuple[list[Item], list[Item] | None]:
        """The policy to sample from, its reference, and its reward on this runtime."""
        objective.bind(model, runtime)
        return train_items, val_items

    def prepare_eval(self, trained: Any, items: list[Item], runtime: Runtime) -> list[Item]:
        trained.objective.bind(trained.model, runtime)
        return items

    def run_record(self, objective: Any) -> dict[str, Any]:
        return {"reward": objective.reward.record}


def check_prompts(
    train: Sequence[SftExample], held_out: Sequence[SftExample], cfg: DataConfig, source: str
) -> QualityReport:
    """The report on prompts: repeated prompts, and validation/test prompts also in training."""
    t = cfg.thresholds
    seen: dict[str, str] = {}
    duplicates: list[str] = []
    for ex in train:
        key = _prompt_key(ex)
        if key in seen:
            duplicates.append(f"{ex.where} (as {seen[key]})")
        seen.setdefault(key, ex.where)
    leaked = [ex.where for ex in held_out if _prompt_key(ex) in seen]
    held_note = "held-out prompts also in training" if held_out else "no validation/test file given"
    fix = "remove these from validation/test (or from training)"
    findings = (
        limited("duplicates", duplicates, len(train), t, "remove the repeated prompts", "the same prompt"),
        limited("leakage", leaked, len(held_out), t, fix, held_note, checked=bool(held_out)),
    )
    return QualityReport(source, "rl", len(train) + len(held_out), findings, "words")


def _prompt_key(ex: SftExample) -> str:
    return "\x00".join(f"{m.role}\x01{m.content}" for m in ex.messages if m.role != "assistant")
