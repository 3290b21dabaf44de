"""The entry points: the CLI, the Python API and (later) the service all call these functions."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.build import build_model, build_objective, prepare_tokenizer, refuse_noop
from tunesmith.config import RunConfig, apply_overrides, config_from_dict, read_yaml_config
from tunesmith.config import load_config as _load_config
from tunesmith.data.load import load_splits, read_sft_examples, read_task_examples
from tunesmith.data.records import check_known_labels
from tunesmith.errors import ConfigError
from tunesmith.eval.answers import answer_prompts, exact_match, split_prompt
from tunesmith.eval.evaluate import evaluate_items, predict_items, score_items
from tunesmith.eval.report import write_report
from tunesmith.eval.retention import build_retention
from tunesmith.models.generate import Sampling
from tunesmith.models.load import load_tokenizer
from tunesmith.run_steps import (
    evaluation_reference,
    final_metrics,
    open_or_create,
    prediction_inputs,
    prepare_objective,
    quality_gate,
    read_task_rows,
    retention_summary,
    skip_unreadable,
    train_summary,
    write_jsonl,
    write_plan,
)
from tunesmith.runs import Run, config_hash, open_run, read_json, write_json, write_manifest
from tunesmith.training.checkpoint import load_trainable, save_trainable
from tunesmith.training.loop import StepCallback, make_autocast, resolve_precision, train_loop
from tunesmith.zoo import model_source_path

__all__ = [
    "RunResult",
    "check_data",
    "clean_data",
    "compare",
    "evaluate",
    "generate",
    "generate_file",
    "load_config",
    "load_trained",
    "predict",
    "score",
    "train",
]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


@dataclass
class Trained:
    """A trained run, loaded for inference."""

    config: RunConfig
    model: nn.Module  # TextClassifier or CausalLM
    objective: Any  # ClassificationObjective or SftObjective
    run: Run


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Read and validate a config (YAML path or dict) with `key.sub=value` overrides."""
    return _load_config(source, overrides)


def train(
    config: RunConfig | dict[str, Any] | str | Path | None = None,
    /,
    *,
    overrides: list[str] | None = None,
    resume: str | Path | None = None,
    callbacks: list[StepCallback] | None = None,
    **sections: Any,
) -> RunResult:
    """Fine-tune a model and write a run directory.

    Args:
        config: a RunConfig, a dict, a YAML path, or None to build one from `sections`
            (e.g. `train(model="minilm-l6", method="lora", data={"train": "x.jsonl"})`).
        overrides: `key.sub=value` strings applied on top.
        resume: an interrupted run directory to continue from its last checkpoint.
        callbacks: called as `callback(step, record)` after every optimizer step.

    Returns:
        The run directory and its final metrics (what eval.json holds).
    """
    cfg = _as_config(config, overrides, sections)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    splits = load_splits(cfg.data, cfg.train.seed, cfg.task)
    tokenizer = prepare_tokenizer(cfg)
    quality = quality_gate(cfg, tokenizer)
    splits = skip_unreadable(splits, quality)
    objective = build_objective(cfg, tokenizer, splits.labels)
    model, method, names = build_model(cfg, len(splits.labels))
    run = open_or_create(cfg, resume)
    fingerprint = {"config_hash": config_hash(cfg.to_dict()), "data_hash": config_hash(splits.hashes, ())}
    train_items = objective.encode(splits.train, "train", pack_rows=True)
    val_items = objective.encode(splits.validation, "validation") if splits.validation else None
    train_items, val_items = prepare_objective(cfg, objective, model, splits, train_items, val_items)
    write_plan(run, cfg, splits, model, names, method, objective, len(train_items))
    if resume is None:
        reward = getattr(objective, "reward_record", None)  # rl: which reward run or function
        extra = {"reward": reward} if reward else None
        write_manifest(run, cfg.train.seed, splits.hashes, model_source_path(cfg.model.name), extra)
    if quality is not None:
        write_json(run.dir / "data_report.json", quality.to_dict())
    if cfg.task == "sft" and splits.validation:
        objective.sample_prompts = [p for p, _ in map(split_prompt, splits.validation) if p][: cfg.eval.samples]
    baseline = final_metrics(cfg, objective, model, splits) if cfg.eval.baseline else None
    retention = build_retention(cfg, objective, lambda source: read_task_rows(cfg, source))
    started = time.perf_counter()
    outcome = train_loop(
        model=model,
        method=method,
        objective=objective,
        train_items=train_items,
        val_items=val_items,
        cfg=cfg.train,
        eval_cfg=cfg.eval,
        run=run,
        names=names,
        fingerprint=fingerprint,
        resume=resume is not None,
        callbacks=callbacks or [],
        retention=retention,
    )
    refuse_noop(method, model)
    model.eval()
    save_trainable(model, names, run.final / "trainable.safetensors")
    if objective.tokenizer is not None:
        objective.tokenizer.save_pretrained(run.final / "tokenizer")
    if splits.labels:
        write_json(run.final / "labels.json", splits.labels)
    metrics = final_metrics(cfg, objective, model, splits)
    if baseline is not None:
        metrics["baseline"] = baseline
    if retention is not None:
        metrics["retention"] = retention_summary(retention, model, cfg, outcome)
    metrics["train"] = train_summary(cfg, model, names, outcome, time.perf_counter() - started)
    write_json(run.dir / "eval.json", metrics)
    write_report(run.dir)
    return RunResult(run.dir, metrics)


def evaluate(
    run_dir: str | Path, data: str | Path, batch_size: int | None = None, generations: str | Path | None = None
) -> dict[str, Any]:
    """Metrics of a trained run on a data file.

    Classification: accuracy, macro-F1, confusion matrix (labels must be known to the run).
    sft: loss, perplexity and token accuracy on the completions, and exact match of greedy answers
    against them; the answers are written as JSONL to `generations` (default: beside the run,
    `generations-<data file stem>.jsonl`).
    """
    trained = load_trained(run_dir)
    cfg = trained.config
    device = _device()
    trained.model.to(device)
    autocast = make_autocast(device, resolve_precision(cfg.train.precision, trained.model))
    size = batch_size or cfg.eval.batch_size
    if cfg.task == "sft":
        examples = read_sft_examples(str(data), cfg.data)
        items = trained.objective.encode(examples, "eval")
        metrics = evaluate_items(trained.model, trained.objective, items, size, autocast, device)
        metrics["rows"] = trained.objective.counts["eval"]
        tok = trained.objective.tokenizer
        template = trained.objective.resolved_template()
        scores, records = exact_match(trained.model, tok, template, examples, cfg.eval.max_new_tokens, size, autocast)
        metrics.update(scores)
        out = Path(generations) if generations else trained.run.dir / f"generations-{Path(data).stem}.jsonl"
        write_jsonl(out, records)
        metrics["generations"] = str(out)
        return metrics
    labelled = read_task_examples(str(data), cfg.data, cfg.task)
    if trained.objective.labels:
        check_known_labels(labelled, trained.objective.labels, str(data))
    items = trained.objective.encode(labelled, "eval")
    if cfg.task == "dpo":
        items = evaluation_reference(trained.model, cfg, trained.objective, items, size, autocast)
    if cfg.task == "rl":
        trained.objective.bind(trained.model, autocast)
    return evaluate_items(trained.model, trained.objective, items, size, autocast, device)


def generate(
    run_dir: str | Path,
    prompts: list[str] | list[list[dict[str, str]]],
    sampling: Sampling | None = None,
    on_token: Any = None,
) -> list[str]:
    """Completions of an instruction-tuned run for text prompts or chat conversations
    (`[{role, content}, ...]`), rendered exactly as training rendered its rows."""
    return generate_with(load_trained(run_dir), prompts, sampling or Sampling(), on_token)


def check_data(
    path: str | Path,
    config: str | Path | None = None,
    task: str | None = None,
    validation: str | Path | None = None,
    max_length: int | None = None,
) -> Any:
    """The data quality report of a data file (what `tunesmith data check` prints): with `config`,
    its data settings, thresholds, task and model tokenizer; leakage against `validation`."""
    from tunesmith.data.quality import check_task_file, quality_setup

    cfg, task_name, tokenizer, references = quality_setup(
        Path(path), task, _path(config), _path(validation), max_length
    )
    return check_task_file(path, cfg, task_name, tokenizer, references)


def clean_data(
    path: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    task: str | None = None,
    validation: str | Path | None = None,
    max_length: int | None = None,
) -> Any:
    """Write the rows of `path` that pass the checks to `out`, and every dropped row with its reason to
    `<out stem>.dropped.jsonl`; returns the report (see `check_data`)."""
    from tunesmith.data.quality import clean_file, quality_setup

    cfg, task_name, tokenizer, references = quality_setup(
        Path(path), task, _path(config), _path(validation), max_length
    )
    if task_name not in ("classification", "sft"):
        raise ConfigError(
            f"data clean is for classification and sft rows; for {task_name} data, run `tunesmith data check` "
            "and fix the rows it lists"
        )
    return clean_file(path, out, cfg, task_name, tokenizer, references)  # type: ignore[arg-type]


def compare(
    config: str | Path,
    methods: list[str] | None = None,
    shots: list[int] | None = None,
    seeds: int = 3,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
) -> tuple[list[dict[str, Any]], Path]:
    """Run `config` with each method (or each few-shot size x seed), each in its own process, and
    tabulate quality, trainable parameters, wall time, peak memory and forgetting (Markdown, HTML,
    JSON beside the runs). Returns the summary rows and the Markdown file."""
    from tunesmith.compare import compare as run_compare
    from tunesmith.compare import plan_variants

    return run_compare(config, plan_variants(methods, shots, seeds), overrides, out)


def _path(value: str | Path | None) -> Path | None:
    return None if value is None else Path(value)


def generate_file(run_dir: str | Path, data: str | Path, sampling: Sampling | None = None) -> list[dict[str, Any]]:
    """{prompt, output} for every row of a data file (completions, if present, are not used)."""
    trained = load_trained(run_dir)
    examples = read_sft_examples(str(data), trained.config.data, require_completion=False)
    prompts: list[Any] = [
        e.text if e.text is not None else [{"role": m.role, "content": m.content} for m in split_prompt(e)[0]]
        for e in examples
    ]
    outputs = generate_with(trained, prompts, sampling or Sampling())
    shown = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    return [{"prompt": p, "output": o} for p, o in zip(shown, outputs, strict=True)]


def generate_with(trained: Trained, prompts: list, sampling: Sampling, on_token: Any = None) -> list[str]:
    """As `generate`, for a run already loaded (the chat loop keeps one). `on_token(row, id)` sees
    each token as it is chosen."""
    from tunesmith.data.sft import Message

    if trained.config.task != "sft":
        raise ConfigError(f"{trained.run.dir}: generation needs an sft run; this one is {trained.config.task}")
    device = _device()
    trained.model.to(device)
    autocast = make_autocast(device, resolve_precision(trained.config.train.precision, trained.model))
    rendered = [p if isinstance(p, str) else tuple(Message(m["role"], m["content"]) for m in p) for p in prompts]
    objective = trained.objective
    return answer_prompts(
        trained.model,
        objective.tokenizer,
        objective.resolved_template(),
        rendered,
        sampling,
        trained.config.eval.batch_size,
        autocast,
        on_token,
    )


def predict(
    run_dir: str | Path, texts: list[str] | None = None, data: str | Path | None = None
) -> list[dict[str, Any]]:
    """Predicted label and class probabilities for each input (or each row of a data file).

    For an image-classification run the inputs are image paths, and each result names its `image`.
    """
    trained = load_trained(run_dir)
    task = trained.config.task
    if task == "sft":
        raise ConfigError(f"{run_dir}: predict is for classification runs; use generate for {task}")
    if (texts is None) == (data is None):
        raise ConfigError("predict: give either inputs or a data file, not both")
    examples = prediction_inputs(trained.config, texts, data)
    device = _device()
    trained.model.to(device)
    autocast = make_autocast(device, resolve_precision(trained.config.train.precision, trained.model))
    probs = predict_items(
        trained.model,
        trained.objective,
        trained.objective.encode(examples),
        trained.config.eval.batch_size,
        autocast,
        device,
    )
    labels = trained.objective.labels
    shown = "image" if task == "image-classification" else "text"
    return [
        {
            shown: ex.where if shown == "image" else ex.text,
            "label": labels[int(p.argmax())],
            "scores": {lab: float(v) for lab, v in zip(labels, p, strict=True)},
        }
        for ex, p in zip(examples, probs, strict=True)
    ]


def score(run_dir: str | Path, prompts: list[str], responses: list[str]) -> list[float]:
    """The reward model's score of each response to its prompt (a reward run)."""
    trained = load_trained(run_dir)
    if trained.config.task != "reward":
        raise ConfigError(f"{run_dir}: score needs a reward run; this one is {trained.config.task}")
    if len(prompts) != len(responses):
        raise ConfigError(f"score: {len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
    device = _device()
    trained.model.to(device)
    autocast = make_autocast(device, resolve_precision(trained.config.train.precision, trained.model))
    items = trained.objective.encode_responses(prompts, responses)
    return score_items(trained.model, trained.objective, items, trained.config.eval.batch_size, autocast, device)


def load_trained(run_dir: str | Path) -> Trained:
    """Rebuild a run's model from its config and load its trained weights (strictly)."""
    run = open_run(run_dir)
    cfg = config_from_dict(run.config(), origin=str(run.dir / "config.yaml"))
    weights = run.final / "trainable.safetensors"
    if not weights.is_file():
        raise ConfigError(f"{run.dir}: the run has no final weights (interrupted? resume it with --resume)")
    labels = read_json(run.final / "labels.json") if cfg.task in ("classification", "image-classification") else []
    model, method, names = build_model(cfg, len(labels))
    load_trainable(model, names, weights)
    refuse_noop(method, model)
    model.eval()
    tokenizer = prepare_tokenizer(cfg, _load_run_tokenizer(run, cfg))
    return Trained(cfg, model, build_objective(cfg, tokenizer, labels), run)


def _as_config(config: RunConfig | dict | str | Path | None, overrides: list[str] | None, sections: dict) -> RunConfig:
    origin = "config"
    if isinstance(config, RunConfig):
        if not overrides and not sections:
            return config
        data = config.to_dict()
    elif config is None:
        data = {}
    elif isinstance(config, dict):
        data = dict(config)
    else:
        data, origin = read_yaml_config(config), str(config)
    data.update(sections)
    return config_from_dict(apply_overrides(data, overrides or []), origin=origin)


def _load_run_tokenizer(run: Run, cfg: RunConfig):
    from transformers import AutoTokenizer

    if cfg.task == "image-classification":
        return None
    saved = run.final / "tokenizer"
    return AutoTokenizer.from_pretrained(saved) if saved.is_dir() else load_tokenizer(cfg.model)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
