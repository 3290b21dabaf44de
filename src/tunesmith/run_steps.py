"""The steps of a training run that `api.train` strings together: the run directory, the plan,
the data quality gate, evaluation with exact match, and the retention summary."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.config import RunConfig
from tunesmith.data.load import Splits, read_examples, read_image_examples, read_task_examples
from tunesmith.eval.answers import exact_match
from tunesmith.eval.evaluate import evaluate_items
from tunesmith.eval.retention import Retention
from tunesmith.methods import Method
from tunesmith.runs import Run, create_run, open_run, write_json
from tunesmith.training.loop import make_autocast, resolve_precision

__all__ = [
    "evaluation_reference",
    "final_metrics",
    "open_or_create",
    "peak_rss_mb",
    "prediction_inputs",
    "prepare_objective",
    "quality_gate",
    "read_task_rows",
    "report_dropped",
    "retention_summary",
    "skip_unreadable",
    "train_summary",
    "write_jsonl",
    "write_plan",
]


def open_or_create(cfg: RunConfig, resume: str | Path | None) -> Run:
    if resume is not None:
        return open_run(resume)
    name = cfg.output.name or f"{cfg.task}-{cfg.method.name}"
    return create_run(cfg.output.dir, name, cfg.to_dict())


def write_plan(
    run: Run,
    cfg: RunConfig,
    splits: Splits,
    model: nn.Module,
    names: list[str],
    method: Method,
    objective,
    n_items: int,
) -> None:
    n_batches = math.ceil(n_items / cfg.train.batch_size)
    steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * math.ceil(n_batches / cfg.train.grad_accum))
    params = dict(model.named_parameters())
    plan = {
        "labels": splits.labels,
        "rows": {
            "train": len(splits.train),
            "replayed": splits.replayed,
            "validation": len(splits.validation or []),
            "test": len(splits.test or []),
        },
        "total_steps": steps,
        "lr": cfg.train.lr if cfg.train.lr is not None else method.default_lr,
        "precision": resolve_precision(cfg.train.precision, model),
        "trainable_parameters": sum(params[n].numel() for n in names if n in params),
        "total_parameters": sum(p.numel() for p in params.values()),
        "trainable_names": names,
    }
    if cfg.task in ("sft", "reward", "dpo"):
        plan["rows_encoded"] = objective.counts
        report_dropped(objective.counts)
    if cfg.task == "sft":
        plan["template"] = objective.resolved_template()
    write_json(run.dir / "plan.json", plan)


def final_metrics(cfg: RunConfig, objective, model, splits: Splits) -> dict[str, Any]:
    device = next(model.parameters()).device
    autocast = make_autocast(device, resolve_precision(cfg.train.precision, model))
    metrics: dict[str, Any] = {}
    for name, examples in (("validation", splits.validation), ("test", splits.test)):
        if examples:
            items = objective.encode(examples, name)
            metrics[name] = evaluate_items(model, objective, items, cfg.eval.batch_size, autocast, device)
            if cfg.task == "sft":
                rows = examples[: cfg.eval.exact_match_rows] if cfg.eval.exact_match_rows else examples
                template = objective.resolved_template()
                scores, _ = exact_match(
                    model, objective.tokenizer, template, rows, cfg.eval.max_new_tokens, cfg.eval.batch_size, autocast
                )
                metrics[name].update(scores)
    return metrics


def quality_gate(cfg: RunConfig, tokenizer: Any) -> Any:
    """The data quality report of the training data (leakage checked against validation/test files);
    under `data.quality: fail` a breached threshold stops the run here, before any model is loaded."""
    from tunesmith.data.load import read_source_rows
    from tunesmith.data.quality import check_rows, gate

    if cfg.data.quality == "off":
        return None
    if cfg.task in ("reward", "dpo", "rl"):
        from tunesmith.data.preference_quality import check_preferences, check_prompts

        held = [
            read_task_examples(s, cfg.data, cfg.task)
            for s in (cfg.data.validation, cfg.data.test)
            if isinstance(s, str)
        ]
        pairs = read_task_examples(cfg.data.train, cfg.data, cfg.task)
        others = [e for h in held for e in h]
        report = (
            check_prompts(pairs, others, cfg.data)
            if cfg.task == "rl"
            else check_preferences(pairs, others, cfg.data, cfg.task)
        )
        gate(report, cfg.data.quality)
        return report
    if cfg.task == "image-classification":
        from tunesmith.data.image_quality import check_images

        held = [read_image_examples(s, cfg.data) for s in (cfg.data.validation, cfg.data.test) if isinstance(s, str)]
        report = check_images(read_image_examples(cfg.data.train, cfg.data), [e for h in held for e in h], cfg.data)
        gate(report, cfg.data.quality)
        return report
    held_out = [s for s in (cfg.data.validation, cfg.data.test) if isinstance(s, str)]
    reference = [row for source in held_out for row in read_source_rows(source, cfg.data)] or None
    rows = read_source_rows(cfg.data.train, cfg.data)
    report = check_rows(rows, cfg.data, cfg.task, tokenizer, reference, source=cfg.data.train)  # type: ignore[arg-type]
    gate(report, cfg.data.quality)
    return report


def read_task_rows(cfg: RunConfig, source: str) -> list[Any]:
    """Examples of the run's task from a file or a packaged data name."""
    return read_task_examples(source, cfg.data, cfg.task)


def prepare_objective(cfg: RunConfig, objective: Any, model: nn.Module, splits: Splits, train_items, val_items):
    """What an objective needs of the model before the first step. dpo: the reference's log-probabilities
    of every pair (train, validation and test), computed once with the model as it starts. rl: the
    policy to sample from and its reference. Other tasks: nothing; the items are returned as they are."""
    if cfg.task not in ("dpo", "rl"):
        return train_items, val_items
    import torch

    model.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    device = next(model.parameters()).device
    autocast = make_autocast(device, resolve_precision(cfg.train.precision, model))
    if cfg.task == "rl":
        objective.bind(model, autocast)
        return train_items, val_items
    if not objective.needs_reference:
        return train_items, val_items
    size = cfg.eval.batch_size
    train_items = objective.add_reference(model, train_items, size, autocast)
    if val_items is not None:
        val_items = objective.add_reference(model, val_items, size, autocast)
    if splits.test:
        objective.add_reference(model, objective.encode(splits.test, "test"), size, autocast)
    return train_items, val_items


def evaluation_reference(model: nn.Module, cfg: RunConfig, objective: Any, items, batch_size: int, autocast):
    """dpo: reference log-probabilities for evaluating a trained run: the trained model with its peft
    adapter switched off where it has one, else the base model built afresh."""
    from tunesmith.build import build_model

    has_switch = callable(getattr(getattr(model, "backbone", None), "disable_adapter", None))
    reference = model if has_switch else build_model(cfg, 0)[0].to(next(model.parameters()).device)
    return objective.add_reference(reference, items, batch_size, autocast)


def skip_unreadable(splits: Splits, report: Any) -> Splits:
    """The splits without the images the quality gate could not read (it has named each one)."""
    bad = set(getattr(report, "unreadable", ()) or ())
    if not bad:
        return splits

    def keep(rows: list[Any] | None) -> list[Any] | None:
        return None if rows is None else [r for r in rows if r.where not in bad]

    print(f"skipping {len(bad)} unreadable image(s); they are listed in data_report.json", file=sys.stderr)
    return replace(splits, train=keep(splits.train) or [], validation=keep(splits.validation), test=keep(splits.test))


def prediction_inputs(cfg: RunConfig, inputs: list[str] | None, data: str | Path | None) -> list[Any]:
    """Unlabelled examples to predict: texts (or image paths) given directly, or a data file's rows."""
    from tunesmith.data.images import ImageExample
    from tunesmith.data.records import Example

    images = cfg.task == "image-classification"
    if data is not None:
        read = read_image_examples if images else read_examples
        return read(str(data), cfg.data, require_labels=False)  # type: ignore[operator]
    if images:
        return [ImageExample(str(Path(p).expanduser()), None, p) for p in inputs or []]
    return [Example(text=t, label=None) for t in inputs or []]


def retention_summary(retention: Retention, model: nn.Module, cfg: RunConfig, outcome: Any) -> dict[str, Any]:
    """The final model's retention against the base model's, and where the best evaluation was."""
    device = next(model.parameters()).device
    final = retention.measure(model, make_autocast(device, resolve_precision(cfg.train.precision, model)), device)
    return {
        **final,
        "source": retention.source,
        "max_drop": retention.max_drop,
        "history": outcome.retention,
        "stopped_for_retention": any(not r["within_bound"] for r in outcome.retention),
    }


def train_summary(cfg: RunConfig, model: nn.Module, names: list[str], outcome: Any, wall: float) -> dict[str, Any]:
    """What eval.json records about training: steps, time, throughput, memory, precision, weights."""
    seconds = max(outcome.train_seconds, 1e-9)
    return {
        "steps": outcome.steps,
        "train_seconds": round(outcome.train_seconds, 3),
        "wall_seconds": round(wall, 3),
        "samples": outcome.samples,
        "tokens": outcome.tokens,
        "samples_per_second": outcome.samples / seconds,
        "tokens_per_second": outcome.tokens / seconds,
        "peak_rss_mb": peak_rss_mb(),
        "best": outcome.best,
        "stopped_early": outcome.stopped_early,
        "skipped_steps": outcome.skipped_steps,
        "precision": resolve_precision(cfg.train.precision, model),
        "trainable_parameters": sum(p.numel() for n, p in model.named_parameters() if n in set(names)),
    }


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def report_dropped(counts: dict[str, dict[str, int]]) -> None:
    """One line on stderr for every split that lost or cut rows (also in plan.json)."""

    for split, c in counts.items():
        lost = {k: c.get(k, 0) for k in ("truncated", "dropped_overlong", "no_trainable_token") if c.get(k, 0)}
        if lost:
            detail = ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in lost.items())
            print(f"{split}: {c['rows']} rows, {detail} (see data.overlong, data.max_length)", file=sys.stderr)


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    import json

    from tunesmith.runs import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
