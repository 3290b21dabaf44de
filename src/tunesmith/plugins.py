"""What a task and a method are to the rest of tunesmith: the protocols every plug-in keeps, and
the two functions that turn a run's config into them.

A **method** changes the model: which weights train and what is added. A **task** owns everything
about its kind of data and output: its config section, the records it reads, its data checks, the
model it needs and which methods fit it, preparation before training, batching, loss and metrics
(its `Objective`), its headline metrics, and what predict, evaluate and score return. Both are
found by name in the registry (tunesmith.registry); nothing outside a plug-in's own files asks
which one is active: what the core needs of a plug-in is a field or method below.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from tunesmith import registry
from tunesmith.config import DataConfig, MethodSection, RunConfig
from tunesmith.data.load import Splits
from tunesmith.data.quality import QualityReport
from tunesmith.runtime import Runtime

__all__ = ["Item", "Method", "Metrics", "Objective", "Output", "Task", "TaskModel", "build_method", "build_task"]

Item = dict[str, Any]  # one encoded example, as its objective's `collate` reads it
Output = Literal["label", "score", "text", "transcript"]


class Method(Protocol):
    """A fine-tuning method (tunesmith/methods/): which weights train and what is added."""

    name: str
    config: type[MethodSection]  # its config section, told apart from the others by `name`
    default_lr: float  # for a transformer; see tunes_pretrained
    # Whether it moves pre-trained weights themselves (full, partial), not only weights it adds or the
    # head: then the model family's `pretrained_lr_scale` multiplies its default rate, and a new head
    # defaults to a higher rate than the rest (training/rates.py).
    tunes_pretrained: bool
    # True when nothing before the head trains: the loop may cache pooled backbone features.
    frozen_backbone: bool
    # Blocks 0..frozen_blocks-1 and the embeddings never train and run without dropout: the loop may
    # cache the token states entering block `frozen_blocks` (0 = nothing to cache). Set by `apply`.
    frozen_blocks: int
    # Positions the method adds in front of every input (prompt tuning's virtual tokens).
    extra_positions: int
    # Whether it learns virtual tokens in front of a text input (prompt and prefix tuning).
    virtual_tokens: bool
    # Why gradient checkpointing cannot run with it (None: it can).
    checkpointing_refusal: str | None
    # Export (tunesmith.exports): whether what it adds is a peft adapter that plain peft loads onto the
    # base, and whether the model, once `merge`d, has exactly the base architecture's layers.
    peft_adapter: bool
    standard_layers: bool

    def apply(self, model: Any) -> None:
        """Prepare `model` in place: wrap or add modules, set `requires_grad` on what trains."""

    def param_groups(self, model: Any, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups over every parameter this method will ever train."""

    def on_epoch_start(self, model: Any, epoch: int) -> None:
        """Hook for schedules that change what trains (gradual unfreezing)."""

    def noop_reason(self, model: Any) -> str | None:
        """Why the added weights are still an identity (None when they moved or cannot tell)."""

    def merge(self, model: Any) -> None:
        """Fold what the method added into one plain network, in place and in the model's dtype
        (LoRA and IA3 into the base weights; nothing to do where no weights were added).

        Raises:
            ConfigError: what it added cannot become part of one network (virtual tokens).
        """


class TaskModel(Protocol):
    """What the core reads of the model a task builds (`Task.build_model`), beyond its forward pass:
    a `backbone` that methods wrap or freeze, a `head` (empty where the task adds none) and the
    model family's learning-rate scale."""

    backbone: nn.Module
    head: nn.Module
    # How many times a transformer's default rate this family's pre-trained weights fine-tune at, with
    # AdamW (1 for transformers; a conv net with batch norm declares more). Measured, see the README.
    pretrained_lr_scale: float


class Metrics(Protocol):
    """Streamed metrics: updated batch by batch, computed once at the end."""

    def update_batch(self, output: Any, batch: dict[str, torch.Tensor]) -> None: ...

    def compute(self) -> dict[str, Any]: ...


class Objective(Protocol):
    """What the training loop and evaluation need of a task for one run (tokenizer and labels bound).

    Items are what `encode` makes of examples; `collate` pads a list of them into a batch of tensors;
    the model's output on `model_inputs(batch)` goes to `loss` and to the metrics.
    """

    default_metric: str  # picks the best checkpoint unless eval.metric says otherwise
    tokenizer: Any | None
    labels: list[str]
    counts: dict[str, dict[str, int]]  # per split: rows read, kept, truncated, dropped (plan.json)

    def encode(self, examples: Sequence[Any], split: str = "train", pack_rows: bool = False) -> list[Item]: ...

    def length(self, item: Item) -> int: ...

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]: ...

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def loss(self, output: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def new_metrics(self) -> Metrics: ...

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
        """Items with frozen work done once: pooled features when nothing before the head trains (`k`
        None), else the states entering block `k`; the items as they are where nothing can be cached."""

    def eval_samples(self, model: Any, runtime: Runtime, max_new_tokens: int) -> list[dict[str, Any]]:
        """What to log beside the metrics at each evaluation (generated answers); [] for none."""

    def step_stats(self) -> dict[str, float]:
        """Numbers logged with the loss at each log step beyond it (rl: reward, KL); {} for none."""


class Task(Protocol):
    """A task (tunesmith/tasks/), built for one run's config by `build_task`."""

    name: str
    summary: str  # one line for the config reference: what the model learns
    section: type[Any] | None  # its own config section (`<name>:` in the YAML), if it has one
    headline: tuple[str, ...]  # held-out metrics that compare and `runs ls` show, most important first
    labelled: bool  # examples carry a label from a label set (resolved from training, checked elsewhere)
    # what a trained run gives: a label (predict), a score (score), text (generate) or a transcript (transcribe)
    output: Output
    retention_default: str | None  # the retention set eval.retention uses when it names none
    retention_metrics: tuple[str, ...]  # metrics of its evaluation that eval.retention may watch

    # --- data ---------------------------------------------------------------------------------
    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[Any]:
        """Examples from a data file, folder or packaged name; `targets=False` for rows to predict on
        (labels or completions may be missing)."""

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        """The data quality report of `source`, with leakage checked against `references`."""

    def clean_data(
        self, source: str, out: Path, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        """Write the rows of `source` worth keeping to `out`, and the dropped ones with their reasons."""

    # --- model --------------------------------------------------------------------------------
    def load_tokenizer(self, saved: Path | None = None) -> Any | None:
        """The tokenizer (or None where inputs are not text): the one saved with a run, else the model's."""

    def check_method(self, method: Method) -> None:
        """Raise ConfigError saying why `method` does not fit this task (return when it fits)."""

    def build_model(self, num_labels: int) -> nn.Module:
        """The base model with what the task adds (a new head, or none), before any method; a
        `TaskModel`."""

    # --- a run --------------------------------------------------------------------------------
    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> Objective:
        """The objective the loop trains."""

    def prepare(
        self,
        objective: Any,
        model: nn.Module,
        runtime: Runtime,
        splits: Splits,
        train_items: list[Item],
        val_items: list[Item] | None,
    ) -> tuple[list[Item], list[Item] | None]:
        """What the objective needs of the model before the first step (DPO: the reference's
        log-probabilities; RL: the policy to sample from); the items, completed."""

    def prepare_eval(self, trained: Any, items: list[Item], runtime: Runtime) -> list[Item]:
        """As `prepare`, for evaluating a trained run (`trained`: an inference.Trained)."""

    def plan(self, objective: Any) -> dict[str, Any]:
        """What plan.json records beyond the generic plan."""

    def run_record(self, objective: Any) -> dict[str, Any]:
        """What manifest.json records beyond the generic manifest (RL: the reward)."""

    def answers(
        self, model: nn.Module, objective: Any, examples: Sequence[Any], runtime: Runtime, limit: int | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Metrics that generate (exact match), and the generated records; ({}, []) for none."""

    # --- a trained run ------------------------------------------------------------------------
    def predict(self, trained: Any, inputs: list[str] | None, data: str | None, runtime: Runtime) -> list[dict]:
        """Label and probabilities of each input (or each row of `data`) for `output == "label"`; the
        transcript of each clip for `output == "transcript"`."""

    def score(self, trained: Any, prompts: list[str], responses: list[str], runtime: Runtime) -> list[float]:
        """The score of each response to its prompt; for `output == "score"`."""


def build_task(cfg: RunConfig) -> Task:
    """The registered task `cfg.task`, built for this run."""
    return registry.task_class(cfg.task)(cfg)  # type: ignore[no-any-return]


def build_method(cfg: MethodSection) -> Method:
    """The registered method for a method config section."""
    return registry.method_class(cfg.name)(cfg)  # type: ignore[no-any-return]
