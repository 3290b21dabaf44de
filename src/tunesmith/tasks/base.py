"""What tasks share: `BaseTask`, the defaults every task starts from (a task overrides what it does
differently), and the helpers of two families of tasks: those that tune a causal LM's own output
layer (sft, dpo, rl) and those that put a new head on a backbone and predict labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config import DataConfig, RunConfig
from tunesmith.data.load import Splits
from tunesmith.data.quality import QualityReport
from tunesmith.errors import ConfigError
from tunesmith.models.causal_lm import CausalLM
from tunesmith.models.load import build_causal_lm, load_tokenizer
from tunesmith.plugins import Item, Method, Output
from tunesmith.runtime import Runtime

__all__ = ["BaseObjective", "BaseTask", "build_lm", "label_rows", "refuse_head_only"]


class BaseTask:
    """Defaults of the `Task` protocol (tunesmith.plugins)."""

    name = "base"
    summary = ""
    section: type[Any] | None = None
    headline: tuple[str, ...] = ()
    labelled = False
    output: Output = "label"
    retention_default: str | None = None
    retention_metrics: tuple[str, ...] = ()

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def clean_data(
        self, source: str, out: Path, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        raise ConfigError(
            f"data clean writes the rows of a file checked row by row; {self.name} data is checked as a whole: "
            "run `tunesmith data check` and fix the rows it lists"
        )

    def load_tokenizer(self, saved: Path | None = None) -> Any | None:
        """The tokenizer saved with a run, else the model's. Without a pad token it pads with EOS
        (padding is masked by the attention mask, so the id does not matter)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(saved) if saved is not None else load_tokenizer(self.cfg.model)
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise ConfigError(f"model.name={self.cfg.model.name}: the tokenizer has neither a pad nor an EOS token")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def check_method(self, method: Method) -> None:
        return None

    def prepare(
        self,
        objective: Any,
        model: nn.Module,
        runtime: Runtime,
        splits: Splits,
        train_items: list[Item],
        val_items: list[Item] | None,
    ) -> tuple[list[Item], list[Item] | None]:
        return train_items, val_items

    def prepare_eval(self, trained: Any, items: list[Item], runtime: Runtime) -> list[Item]:
        return items

    def plan(self, objective: Any) -> dict[str, Any]:
        return {}

    def run_record(self, objective: Any) -> dict[str, Any]:
        return {}

    def answers(
        self, model: nn.Module, objective: Any, examples: Sequence[Any], runtime: Runtime, limit: int | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        return {}, []

    def predict(self, trained: Any, inputs: list[str] | None, data: str | None, runtime: Runtime) -> list[dict]:
        raise ConfigError(f"{trained.where}: predict is for runs that give labels; this {self.name} run does not")

    def score(self, trained: Any, prompts: list[str], responses: list[str], runtime: Runtime) -> list[float]:
        raise ConfigError(f"{trained.where}: score is for runs that give scores; this {self.name} run does not")


class BaseObjective:
    """Defaults of the `Objective` protocol (tunesmith.plugins): no labels unless given, nothing
    counted, nothing cached, generated or logged beyond the loss."""

    default_metric = "loss"
    # Batches are sampled from the model as it trains (RL): collating one has effects (a generation,
    # a reward call, random draws), so nothing probes a batch before training.
    samples_while_training = False
    # Rows a training pass runs for each item (DPO and reward models: the chosen and the rejected
    # response; RL: the group of samples of its prompt): the kernel probes measure at that many rows
    # (training/kernels.py `pass_shape`, which also reads an optional `row_length(item)` where rows
    # grow longer than `length` as the run trains: RL's completions).
    rows_per_item = 1

    def __init__(self, tokenizer: Any | None, labels: Sequence[str] = ()) -> None:
        self.tokenizer: Any = tokenizer  # None where inputs are not text
        self.labels = list(labels)
        self.counts: dict[str, dict[str, int]] = {}  # per split: rows read, kept, truncated, dropped

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every tensor of the batch but the labels (the loss reads those)."""
        return {k: v for k, v in batch.items() if k != "labels"}

    def cache_frozen(
        self,
        model: Any,
        items: Sequence[Item],
        k: int | None,
        runtime: Runtime,
        max_bytes: int,
        spill_dir: Path,
        name: str,
    ) -> list[Item]:
        """Items as they are: nothing before the trainable weights is cached."""
        return list(items)

    def eval_samples(self, model: Any, runtime: Runtime, max_new_tokens: int) -> list[dict[str, Any]]:
        return []  # nothing generated to log

    def step_stats(self) -> dict[str, float]:
        return {}  # nothing logged beyond the loss


# --- tasks that tune a causal LM (its output layer is the pre-trained one; no new head) ---------


def build_lm(cfg: RunConfig) -> CausalLM:
    """The pre-trained causal LM of `model`, its attention kernel chosen for `data.max_length`."""
    return build_causal_lm(cfg.model, cfg.data.max_length)


def refuse_head_only(method: Method) -> None:
    """A method that trains only a new head has nothing to train on a causal LM."""
    if method.frozen_backbone:
        raise ConfigError(
            f"method.name={method.name} trains only a new head, and a causal LM gets none (its output "
            "layer is the pre-trained one, often tied to the input embedding); use lora, partial, adapter, "
            "ia3, prompt-tuning, prefix-tuning or full"
        )


# --- tasks that predict labels -------------------------------------------------------------------


def label_rows(
    examples: Sequence[Any], probs: torch.Tensor, labels: Sequence[str], shown: Callable[[Any], dict[str, Any]]
) -> list[dict[str, Any]]:
    """One prediction per example: what it was (`shown`), the label and every label's probability."""
    return [
        {
            **shown(example),
            "label": labels[int(p.argmax())],
            "scores": {label: float(v) for label, v in zip(labels, p, strict=True)},
        }
        for example, p in zip(examples, probs, strict=True)
    ]
