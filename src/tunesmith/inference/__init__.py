"""A trained run loaded for use: what predict, evaluate, score, generate, RL's reward runs and
preference sampling share (and, later, export and the service).

`load_trained` rebuilds a run's model from its saved config through the task and method plug-ins
and loads its trained weights strictly; `base_model` gives the model it started from, for the
comparisons DPO evaluation and drift measurements make. `adapters.load_adapters` loads several runs
onto one base model as named peft adapters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.build import build_model, refuse_noop
from tunesmith.config import DataConfig, RunConfig, config_from_dict, load_config
from tunesmith.data.load import Splits, read_sft_examples
from tunesmith.data.sft import Message, SftExample
from tunesmith.data.templates import resolve_template
from tunesmith.errors import ConfigError
from tunesmith.eval.answers import answer_prompts, split_prompt
from tunesmith.eval.evaluate import evaluate_items
from tunesmith.models.anatomy import can_switch_off
from tunesmith.models.generate import Sampling
from tunesmith.plugins import Method, Objective, Task, build_method, build_task
from tunesmith.runs import Run, open_run, read_json
from tunesmith.runtime import Runtime, make_runtime
from tunesmith.training.checkpoint import load_trainable
from tunesmith.training.kernels import MEMORY_FORMATS

__all__ = [
    "SavedRun",
    "TextStream",
    "Trained",
    "base_model",
    "generate",
    "held_out_metrics",
    "load_base",
    "load_trained",
    "prompt_inputs",
    "read_prompts",
    "read_saved_run",
    "runtime_for",
]


@dataclass
class Trained:
    """A trained run (or a base model standing in for one), loaded for inference."""

    config: RunConfig
    task: Task
    method: Method
    model: nn.Module
    objective: Objective
    run: Run | None  # None for a base model that never trained

    @property
    def where(self) -> str:
        """How messages name it: the run directory, or the model."""
        return str(self.run.dir) if self.run is not None else self.config.model.name


@dataclass(frozen=True)
class SavedRun:
    """A finished run as its directory records it: config, plug-ins, labels and where its trained
    weights are; nothing loaded yet."""

    run: Run
    config: RunConfig
    task: Task
    method: Method
    labels: list[str]

    @property
    def weights(self) -> Path:
        return self.run.final / "trainable.safetensors"

    def load_objective(self) -> Objective:
        """The run's objective with the tokenizer it saved. Load it before building the model: what a
        task saved with its tokenizer (a speech run's clip length) may shape the model."""
        saved = self.run.final / "tokenizer"
        tokenizer = self.task.load_tokenizer(saved if saved.is_dir() else None)
        return self.task.objective(tokenizer, self.labels)


def read_saved_run(run_dir: str | Path) -> SavedRun:
    """A finished run's record, its config validated and its plug-ins built.

    Raises:
        ConfigError: not a run directory, or a run with no final weights.
    """
    run = open_run(run_dir)
    cfg = config_from_dict(run.config(), origin=str(run.dir / "config.yaml"))
    if not (run.final / "trainable.safetensors").is_file():
        raise ConfigError(f"{run.dir}: the run has no final weights (interrupted? resume it with --resume)")
    labels_file = run.final / "labels.json"
    labels = [str(x) for x in read_json(labels_file)] if labels_file.is_file() else []
    return SavedRun(run, cfg, build_task(cfg), build_method(cfg.method), labels)


def load_trained(run_dir: str | Path) -> Trained:
    """Rebuild a run's model from its config and load its trained weights (strictly).

    Raises:
        ConfigError: not a run directory, no final weights, or weights that do not fit the model.
    """
    saved = read_saved_run(run_dir)
    objective = saved.load_objective()
    model, names = build_model(saved.config, saved.task, saved.method, len(saved.labels))
    load_trainable(model, names, saved.weights)
    refuse_noop(saved.method, model)
    layout = saved.run.plan().get("kernels", {}).get("memory_format", {}).get("choice")
    if layout is not None and callable(getattr(model, "use_memory_format", None)):
        model.use_memory_format(MEMORY_FORMATS[layout])  # type: ignore[operator]  # as it trained: convolutions compute as then
    model.eval()
    return Trained(saved.config, saved.task, saved.method, model, objective, saved.run)


def load_base(model: str, task: str, data: str) -> Trained:
    """A model as it comes (a packaged name, directory, .gguf file or hub id), loaded as a run of
    `task` would load it before training, with `method: full` (nothing added); `data` is the data the
    run would read (sampling prompts)."""
    cfg = load_config({"model": model, "task": task, "method": "full", "data": {"train": data}})
    plugin, method = build_task(cfg), build_method(cfg.method)
    built, _ = build_model(cfg, plugin, method, 0)
    return Trained(cfg, plugin, method, built.eval(), plugin.objective(plugin.load_tokenizer(), []), None)


def runtime_for(trained: Trained) -> Runtime:
    """The runtime of a command on a loaded run (its model moved to the device)."""
    runtime = make_runtime(trained.config.train, trained.config.eval, trained.model)
    trained.model.to(runtime.device)
    return runtime


def base_model(trained: Trained) -> nn.Module:
    """The model `trained` started from: the trained model itself where its peft adapter can be
    switched off (switch it off with `models.anatomy.adapters_off`), else the base built afresh."""
    if can_switch_off(trained.model):
        return trained.model
    cfg = trained.config
    base, _ = build_model(cfg, trained.task, build_method(cfg.method), len(trained.objective.labels))
    return base.to(next(trained.model.parameters()).device).eval()


def held_out_metrics(
    task: Task, objective: Objective, model: nn.Module, splits: Splits, runtime: Runtime, limit: int | None
) -> dict[str, Any]:
    """Metrics on the validation and test splits, with what the task generates (exact match on up to
    `limit` rows)."""
    metrics: dict[str, Any] = {}
    for name, examples in (("validation", splits.validation), ("test", splits.test)):
        if examples:
            metrics[name] = evaluate_items(model, objective, objective.encode(examples, name), runtime)
            scores, _ = task.answers(model, objective, examples, runtime, limit)
            metrics[name].update(scores)
    return metrics


def read_prompts(source: str | Path, data: DataConfig) -> list[SftExample]:
    """Rows of prompts to answer (prompt/completion, Alpaca, chat or plain text; completions unused)."""
    return read_sft_examples(str(source), data, require_completion=False)


def prompt_inputs(examples: Sequence[SftExample]) -> list[str | list[dict[str, str]]]:
    """What `generate` takes for each row: its text, or its conversation up to the last answer."""
    return [
        e.text if e.text is not None else [{"role": m.role, "content": m.content} for m in split_prompt(e)[0]]
        for e in examples
    ]


def generate(
    trained: Trained,
    prompts: Sequence[str | Sequence[dict[str, str]]],
    sampling: Sampling,
    runtime: Runtime,
    on_token: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Completions for text prompts or conversations (`[{role, content}, ...]`), rendered exactly as
    training rendered its rows; `on_token(row, id)` sees each token as it is chosen.

    Raises:
        ConfigError: the run's task does not generate text.
    """
    if trained.task.output != "text":
        raise ConfigError(
            f"{trained.where}: a {trained.config.task} run gives a {trained.task.output}, not text; "
            f"use tunesmith {'predict' if trained.task.output == 'label' else 'score'}"
        )
    tokenizer: Any = trained.objective.tokenizer
    template = resolve_template(tokenizer, trained.config.data.template)
    rendered = [p if isinstance(p, str) else tuple(_message(m) for m in p) for p in prompts]
    return answer_prompts(
        trained.model, tokenizer, template, rendered, sampling, runtime.eval_batch_size, runtime.autocast, on_token
    )


def _message(turn: dict[str, str]) -> Message:
    role = turn["role"]
    if role not in ("system", "user", "assistant"):
        raise ConfigError(f"a conversation turn has role {role!r}; use system, user or assistant")
    return Message(role, turn["content"])  # type: ignore[arg-type]  # checked just above


class TextStream:
    """An `on_token` callback that turns the ids of one generation into text as they are chosen, and
    passes each new piece to `on_text`; a piece never ends inside a multi-byte character."""

    def __init__(self, tokenizer: Any, on_text: Callable[[str], None]) -> None:
        self.tokenizer, self.on_text = tokenizer, on_text
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, _row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.on_text(text[len(self.shown) :])
            self.shown = text

    def finish(self, answer: str) -> None:
        """Pass on what of the final `answer` was not shown yet."""
        if answer[len(self.shown) :]:
            self.on_text(answer[len(self.shown) :])
        self.shown = answer
