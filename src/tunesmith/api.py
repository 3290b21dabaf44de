"""The entry points: the CLI, the Python API and (later) the service all call these functions."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.config import RunConfig, apply_overrides, config_from_dict, read_yaml_config
from tunesmith.config import load_config as _load_config
from tunesmith.data.load import Splits, load_splits, read_examples
from tunesmith.data.records import check_known_labels
from tunesmith.errors import ConfigError
from tunesmith.eval.evaluate import evaluate_items, predict_items
from tunesmith.methods import Method, build_method
from tunesmith.models.classifier import TextClassifier
from tunesmith.models.load import build_classifier, load_tokenizer
from tunesmith.objectives.classification import ClassificationObjective
from tunesmith.runs import Run, config_hash, create_run, open_run, read_json, write_json, write_manifest
from tunesmith.training.checkpoint import load_trainable, save_trainable
from tunesmith.training.loop import StepCallback, make_autocast, resolve_precision, train_loop
from tunesmith.zoo import resolve_model_path

__all__ = ["RunResult", "evaluate", "load_config", "load_trained", "predict", "train"]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]


@dataclass
class Trained:
    """A trained run, loaded for inference."""

    config: RunConfig
    model: TextClassifier
    objective: ClassificationObjective
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
    splits = load_splits(cfg.data, cfg.train.seed)
    objective = ClassificationObjective(load_tokenizer(cfg.model), splits.labels, cfg.data.max_length)
    model, method, names = _build(cfg, len(splits.labels))
    run = _open_or_create(cfg, resume)
    fingerprint = {"config_hash": config_hash(cfg.to_dict()), "data_hash": config_hash(splits.hashes, ())}
    _write_plan(run, cfg, splits, model, names, method)
    if resume is None:
        write_manifest(run, cfg.train.seed, splits.hashes, resolve_model_path(cfg.model.name))
    baseline = _final_metrics(cfg, objective, model, splits) if cfg.eval.baseline else None
    started = time.perf_counter()
    outcome = train_loop(
        model=model,
        method=method,
        objective=objective,
        train_items=objective.encode(splits.train),
        val_items=objective.encode(splits.validation) if splits.validation else None,
        cfg=cfg.train,
        eval_cfg=cfg.eval,
        run=run,
        names=names,
        fingerprint=fingerprint,
        resume=resume is not None,
        callbacks=callbacks or [],
    )
    _refuse_noop(method, model)
    model.eval()
    save_trainable(model, names, run.final / "trainable.safetensors")
    objective.tokenizer.save_pretrained(run.final / "tokenizer")
    write_json(run.final / "labels.json", splits.labels)
    metrics = _final_metrics(cfg, objective, model, splits)
    if baseline is not None:
        metrics["baseline"] = baseline
    metrics["train"] = {
        "steps": outcome.steps,
        "train_seconds": round(outcome.train_seconds, 3),
        "wall_seconds": round(time.perf_counter() - started, 3),
        "samples": outcome.samples,
        "tokens": outcome.tokens,
        "samples_per_second": outcome.samples / max(outcome.train_seconds, 1e-9),
        "tokens_per_second": outcome.tokens / max(outcome.train_seconds, 1e-9),
        "peak_rss_mb": peak_rss_mb(),
        "best": outcome.best,
        "stopped_early": outcome.stopped_early,
        "precision": resolve_precision(cfg.train.precision),
        "trainable_parameters": sum(p.numel() for n, p in model.named_parameters() if n in set(names)),
    }
    write_json(run.dir / "eval.json", metrics)
    return RunResult(run.dir, metrics)


def evaluate(run_dir: str | Path, data: str | Path, batch_size: int | None = None) -> dict[str, Any]:
    """Metrics of a trained run on a labelled data file (its labels must be known to the run)."""
    trained = load_trained(run_dir)
    examples = read_examples(str(data), trained.config.data)
    check_known_labels(examples, trained.objective.labels, str(data))
    device = _device()
    trained.model.to(device)
    autocast = make_autocast(device, resolve_precision(trained.config.train.precision))
    return evaluate_items(
        trained.model,
        trained.objective,
        trained.objective.encode(examples),
        batch_size or trained.config.eval.batch_size,
        autocast,
        device,
    )


def predict(
    run_dir: str | Path, texts: list[str] | None = None, data: str | Path | None = None
) -> list[dict[str, Any]]:
    """Predicted label and class probabilities for each text (or each row of a data file)."""
    from tunesmith.data.records import Example

    trained = load_trained(run_dir)
    if (texts is None) == (data is None):
        raise ConfigError("predict: give either texts or a data file, not both")
    if data is not None:
        examples = read_examples(str(data), trained.config.data, require_labels=False)
    else:
        examples = [Example(text=t, label=None) for t in texts or []]
    device = _device()
    trained.model.to(device)
    autocast = make_autocast(device, resolve_precision(trained.config.train.precision))
    probs = predict_items(
        trained.model,
        trained.objective,
        trained.objective.encode(examples),
        trained.config.eval.batch_size,
        autocast,
        device,
    )
    labels = trained.objective.labels
    return [
        {
            "text": ex.text,
            "label": labels[int(p.argmax())],
            "scores": {lab: float(v) for lab, v in zip(labels, p, strict=True)},
        }
        for ex, p in zip(examples, probs, strict=True)
    ]


def load_trained(run_dir: str | Path) -> Trained:
    """Rebuild a run's model from its config and load its trained weights (strictly)."""
    run = open_run(run_dir)
    cfg = config_from_dict(run.config(), origin=str(run.dir / "config.yaml"))
    labels_path = run.final / "labels.json"
    if not labels_path.is_file():
        raise ConfigError(f"{run.dir}: the run has no final weights (interrupted? resume it with --resume)")
    labels = read_json(labels_path)
    model, method, names = _build(cfg, len(labels))
    load_trainable(model, names, run.final / "trainable.safetensors")
    _refuse_noop(method, model)
    model.eval()
    tokenizer = _load_run_tokenizer(run, cfg)
    return Trained(cfg, model, ClassificationObjective(tokenizer, labels, cfg.data.max_length), run)


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _build(cfg: RunConfig, num_labels: int) -> tuple[TextClassifier, Method, list[str]]:
    model = build_classifier(cfg.model, num_labels, cfg.train.seed)
    method = build_method(cfg.method)
    _check_positions(cfg, model, method)
    method.apply(model)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return model, method, names


def _check_positions(cfg: RunConfig, model: TextClassifier, method: Method) -> None:
    limit = getattr(getattr(model.backbone, "config", None), "max_position_embeddings", None)
    needed = cfg.data.max_length + method.extra_positions
    if limit is not None and needed > limit:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} + {method.extra_positions} virtual tokens of method.name="
            f"{method.name} is {needed} positions, but the model has {limit}; lower data.max_length"
        )


def _refuse_noop(method: Method, model: TextClassifier) -> None:
    reason = method.noop_reason(model)
    if reason:
        raise ConfigError(f"method.name={method.name}: {reason}; check train.lr, train.epochs and the data")


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


def _open_or_create(cfg: RunConfig, resume: str | Path | None) -> Run:
    if resume is not None:
        return open_run(resume)
    name = cfg.output.name or f"{cfg.task}-{cfg.method.name}"
    return create_run(cfg.output.dir, name, cfg.to_dict())


def _write_plan(run: Run, cfg: RunConfig, splits: Splits, model: TextClassifier, names: list[str], method) -> None:
    n_batches = math.ceil(len(splits.train) / cfg.train.batch_size)
    steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * math.ceil(n_batches / cfg.train.grad_accum))
    params = dict(model.named_parameters())
    plan = {
        "labels": splits.labels,
        "rows": {
            "train": len(splits.train),
            "validation": len(splits.validation or []),
            "test": len(splits.test or []),
        },
        "total_steps": steps,
        "lr": cfg.train.lr if cfg.train.lr is not None else method.default_lr,
        "precision": resolve_precision(cfg.train.precision),
        "trainable_parameters": sum(params[n].numel() for n in names),
        "total_parameters": sum(p.numel() for p in params.values()),
        "trainable_names": names,
    }
    write_json(run.dir / "plan.json", plan)


def _final_metrics(cfg: RunConfig, objective, model, splits: Splits) -> dict[str, Any]:
    device = next(model.parameters()).device
    autocast = make_autocast(device, resolve_precision(cfg.train.precision))
    metrics: dict[str, Any] = {}
    for name, examples in (("validation", splits.validation), ("test", splits.test)):
        if examples:
            items = objective.encode(examples)
            metrics[name] = evaluate_items(model, objective, items, cfg.eval.batch_size, autocast, device)
    return metrics


def _load_run_tokenizer(run: Run, cfg: RunConfig):
    from transformers import AutoTokenizer

    saved = run.final / "tokenizer"
    return AutoTokenizer.from_pretrained(saved) if saved.is_dir() else load_tokenizer(cfg.model)


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
