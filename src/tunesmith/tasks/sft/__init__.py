"""Instruction tuning (supervised fine-tuning) of a causal LM: prompt -> completion, with the
next-token loss on completion (assistant) tokens only; loss, perplexity, exact match and samples.

Rows are prompt/completion, Alpaca, OpenAI chat or plain text (data/sft.py), rendered with the
tokenizer's own chat template (data/templates.py); objective.py batches and scores them, checks.py
is the data gate's view of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.config import DataConfig
from tunesmith.data.load import Splits, read_sft_examples
from tunesmith.data.quality import QualityReport, check_file, clean_file
from tunesmith.errors import ConfigError
from tunesmith.eval.answers import exact_match, split_prompt
from tunesmith.plugins import Item, Method
from tunesmith.registry import register_task
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseTask, build_lm, refuse_head_only
from tunesmith.tasks.sft.checks import SftRows
from tunesmith.tasks.sft.objective import SftObjective

__all__ = ["SftTask"]


@register_task("sft")
class SftTask(BaseTask):
    """Prompt -> completion: instruction tuning of a causal LM."""

    name = "sft"
    summary = "instruction tuning a causal LM: prompt -> completion"
    headline = ("exact_match", "loss")
    output = "text"
    retention_default = "hamlet-retention"  # packaged general English: Acts IV-V of Hamlet (zoo.py)
    retention_metrics = ("perplexity",)

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[Any]:
        return read_sft_examples(source, data, require_completion=targets)

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        return check_file(source, data, SftRows(data), tokenizer, references)

    def clean_data(
        self, source: str, out: Path, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        return clean_file(source, out, data, SftRows(data), tokenizer, references)

    def check_method(self, method: Method) -> None:
        refuse_head_only(method)
        if self.cfg.data.packing and method.virtual_tokens:
            raise ConfigError(
                f"data.packing with method.name={method.name}: the virtual tokens would be shared by every row "
                "packed into a sequence; turn packing off for prompt and prefix tuning"
            )

    def build_model(self, num_labels: int) -> nn.Module:
        return build_lm(self.cfg)

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> SftObjective:
        d = self.cfg.data
        return SftObjective(tokenizer, d.max_length, d.template, d.train_on_prompt, d.overlong, d.packing)

    def prepare(
        self,
        objective: Any,
        model: nn.Module,
        runtime: Runtime,
        splits: Splits,
        train_items: list[Item],
        val_items: list[Item] | None,
    ) -> tuple[list[Item], list[Item] | None]:
        """The validation prompts answered and logged at each evaluation (`eval.samples`)."""
        prompts = [p for p, _ in map(split_prompt, splits.validation or []) if p]
        objective.sample_prompts = prompts[: self.cfg.eval.samples]
        return train_items, val_items

    def plan(self, objective: Any) -> dict[str, Any]:
        return {"template": objective.resolved_template()}

    def answers(
        self, model: nn.Module, objective: Any, examples: Sequence[Any], runtime: Runtime, limit: int | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Exact match of greedy answers against the reference completions (up to `limit` rows)."""
        rows = examples[:limit] if limit else examples
        e = self.cfg.eval
        template = objective.resolved_template()
        return exact_match(
            model, objective.tokenizer, template, rows, e.max_new_tokens, runtime.eval_batch_size, runtime.autocast
        )
