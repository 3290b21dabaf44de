"""The entry points: the CLI, the Python API and (later) the service all call these functions.

A command reads its config, finds the run's task and method plug-ins (tunesmith.plugins), builds
one `Runtime`, and strings the generic steps together; what differs between tasks is asked of the
task, never decided here by its name.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tunesmith import registry
from tunesmith.build import build_model, enable_checkpointing, refuse_noop
from tunesmith.config import RunConfig, apply_overrides, config_from_dict, read_yaml_config
from tunesmith.config import load_config as _load_config
from tunesmith.data.load import Splits, load_splits, without_unreadable
from tunesmith.data.quality import QualityReport, gate
from tunesmith.data.records import check_known_labels
from tunesmith.errors import ConfigError
from tunesmith.eval.evaluate import evaluate_items
from tunesmith.eval.report import write_report
from tunesmith.eval.retention import build_retention
from tunesmith.exports import Exported, export_run
from tunesmith.inference import (
    TextStream,
    Trained,
    held_out_metrics,
    load_trained,
    prompt_inputs,
    read_prompts,
    runtime_for,
)
from tunesmith.inference import generate as generate_with
from tunesmith.inference.adapters import Adapters, RunsArg, load_adapters
from tunesmith.models.generate import Sampling
from tunesmith.plugins import Method, Task, build_method, build_task
from tunesmith.runs import (
    Run,
    config_hash,
    list_runs,
    open_or_create,
    read_json,
    write_json,
    write_jsonl,
    write_manifest,
)
from tunesmith.runtime import Runtime, make_runtime
from tunesmith.search import TuneResult
from tunesmith.trackers import Trackers, build_trackers
from tunesmith.training.checkpoint import save_tensors
from tunesmith.training.distributed import Processes, start_processes
from tunesmith.training.kernels import choose_kernels, pass_shape
from tunesmith.training.loop import StepCallback, train_loop
from tunesmith.training.plan import report_dropped, run_plan, train_summary
from tunesmith.zoo import model_source_path

__all__ = [
    "Adapters",
    "RunResult",
    "RunSummary",
    "Sampling",
    "TextStream",
    "Trained",
    "check_data",
    "clean_data",
    "compare",
    "evaluate",
    "generate",
    "generate_file",
    "generate_with",
    "load_adapters",
    "load_config",
    "load_trained",
    "plan",
    "predict",
    "preference_pairs",
    "run_summaries",
    "runtime_for",
    "score",
    "train",
    "transcribe",
    "tune",
    "tune_report",
]


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    metrics: dict[str, Any]
    main: bool = True  # False in the processes of a multi-process run that write nothing (rank > 0)


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
    processes = start_processes(not torch.cuda.is_available(), cfg.train.distributed)
    result = _train(cfg, processes, resume, callbacks)
    processes.finish()
    return result


def _train(
    cfg: RunConfig, processes: Processes, resume: str | Path | None, callbacks: list[StepCallback] | None
) -> RunResult:
    main = processes.main
    # a tracker that is not installed stops the run here, before any work; only rank 0 reports
    trackers = build_trackers(cfg) if main else Trackers([])
    data = _read_data(cfg)
    task, method, splits, quality, objective = data.task, data.method, data.splits, data.quality, data.objective
    model, names, runtime = _build_run_model(cfg, data, processes)
    name = cfg.output.name or f"{cfg.task}-{cfg.method.name}"
    made = open_or_create(cfg.output.dir, name, cfg.to_dict(), resume).dir if main or resume else None
    run = Run(processes.broadcast(made))  # rank 0 makes the directory; the others learn its name
    fingerprint = {"config_hash": config_hash(cfg.to_dict()), "data_hash": config_hash(splits.hashes, ())}
    recorded = run.plan() if resume is not None and main else {}
    # a resumed run computes as it began: its kernels as recorded, the same in every process
    kept_kernels = processes.broadcast(recorded.get("kernels"))
    train_items, val_items, kernels = _encode(
        data, model, runtime, cfg.train.batch_size, kept_kernels, processes.broadcast
    )
    checkpointing = _auto_checkpointing(cfg, data, model, names, runtime, train_items, recorded, processes)
    if main:
        n = len(train_items)
        planned = run_plan(cfg.train, runtime.precision, model, names, n, processes.world)
        # A resumed run keeps its range test (train.lr: auto) and kernel choices: the loop reuses them.
        kept = {k: v for k, v in recorded.items() if k in ("lr_finder", "kernels")}
        kept |= {"gradient_checkpointing": checkpointing} if checkpointing is not None else {}
        described = _describe_data(splits, objective) | planned | task.plan(objective) | kept
        write_json(run.dir / "plan.json", described)
    if resume is None and main:
        extra = task.run_record(objective)
        write_manifest(run, cfg.train.seed, splits.hashes, model_source_path(cfg.model.name), extra or None)
    if quality is not None and main:
        write_json(run.dir / "data_report.json", quality.to_dict())
    limit = cfg.eval.exact_match_rows
    evaluates = cfg.eval.baseline and main
    baseline = held_out_metrics(task, objective, model, splits, runtime, limit) if evaluates else None
    retention = build_retention(
        cfg.eval.retention,
        task.retention_default,
        task.retention_metrics,
        objective,
        lambda source: task.read_examples(source, cfg.data),
        cfg.train.seed,
        cfg.eval.batch_size,
    )
    with trackers.active(run.dir, cfg.to_dict()):  # a run that raises is closed as failed there
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
            runtime=runtime,
            processes=processes,
            resume=resume is not None,
            callbacks=[trackers.log, *(callbacks or [])],  # trackers first: a step that stops the run is kept
            retention=retention,
            kernels=kernels,
        )
        if not processes.evaluates:  # DDP: rank 0 alone finishes; FSDP: every process runs the passes
            return RunResult(run.dir, {}, main=False)
        refuse_noop(method, model)
        model.eval()
        weights = processes.weights(model, names)
        metrics = held_out_metrics(task, objective, model, splits, runtime, limit)
        if retention is not None:
            metrics["retention"] = retention.summary(model, runtime, outcome.retention)
        if weights is None:
            return RunResult(run.dir, {}, main=False)
        save_tensors(weights, run.final / "trainable.safetensors")
        if objective.tokenizer is not None:
            objective.tokenizer.save_pretrained(run.final / "tokenizer")
        if splits.labels:
            write_json(run.final / "labels.json", splits.labels)
        if baseline is not None:
            metrics["baseline"] = baseline
        metrics["train"] = train_summary(outcome, model, names, runtime.precision, time.perf_counter() - started)
        write_json(run.dir / "eval.json", metrics)
        write_report(run.dir)
        trackers.finish(run.dir, metrics)
    return RunResult(run.dir, metrics)


def plan(
    config: RunConfig | dict[str, Any] | str | Path | None = None,
    /,
    *,
    overrides: list[str] | None = None,
    memory_limit_gb: float | None = None,
    dry_run: bool = True,
    **sections: Any,
) -> dict[str, Any]:
    """Check a run before it trains: parameter counts, an estimate of its peak memory and step time
    from the model's shapes, a measured dry run (three optimizer steps and one evaluation batch, in a
    temporary directory: `output.dir` gets no run), the two compared, the whole run's projected
    time, and whether it fits in memory.

    Args:
        config, overrides, sections: as for `train`.
        memory_limit_gb: the memory the run may use (default: what the machine has available).
        dry_run: False for the estimate alone.

    Returns:
        The plan as plain data (what `tunesmith plan --json` prints); `memory.fits` is False, and
        `levers` lists config changes by the memory they save, when the peak exceeds the limit.

    Raises:
        ConfigError: the config, its data or its method does not fit (as `train` would say).
    """
    from tunesmith.preflight import baseline, check_run, with_model

    cfg = _as_config(config, overrides, sections)
    data = _read_data(cfg)
    start = baseline()
    model, names, runtime = _build_run_model(cfg, data)
    start = with_model(start, model)
    train_items, val_items, _ = _encode(data, model, runtime, cfg.train.batch_size)
    checkpointing = _auto_checkpointing(cfg, data, model, names, runtime, train_items, {}, None)
    if checkpointing is not None and checkpointing["on"]:  # the plan of the run as auto will train it
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"gradient_checkpointing": True})})
    counts = run_plan(cfg.train, runtime.precision, model, names, len(train_items))
    items = (train_items, val_items, len(data.splits.test or []))
    report = check_run(
        cfg, data.method, data.objective, model, names, runtime, items, counts, start, memory_limit_gb, dry_run
    )
    auto = {"gradient_checkpointing": checkpointing} if checkpointing is not None else {}
    return {"model": cfg.model.name, "task": cfg.task, "method": cfg.method.name} | report | auto


def _auto_checkpointing(
    cfg: RunConfig,
    data: _RunData,
    model: torch.nn.Module,
    names: list[str],
    runtime: Runtime,
    train_items: list[Any],
    recorded: dict[str, Any],
    processes: Processes | None,
) -> dict[str, Any] | None:
    """`train.gradient_checkpointing: auto` decided (`preflight.checkpointing_decision`) and applied
    to `model`; None under a fixed setting. A resumed run keeps the decision its plan.json `recorded`;
    in a multi-process run rank 0 decides for all."""
    if cfg.train.gradient_checkpointing != "auto":
        return None
    from tunesmith.preflight import CHECKPOINTING_PRESSURE, checkpointing_decision

    decision: dict[str, Any] | None = recorded.get("gradient_checkpointing")
    if decision is None and (processes is None or processes.main):
        decision = checkpointing_decision(cfg, data.method, data.objective, model, names, runtime, train_items)
    if processes is not None:
        decision = processes.broadcast(decision)
    assert decision is not None, "rank 0 decided"
    if decision["on"]:
        enable_checkpointing(model, data.method)
        peak, available = decision["estimated_peak_mb"], decision["available_mb"]
        print(
            f"train.gradient_checkpointing: auto turned it on: the estimated peak, {peak:,.0f} MB, "
            f"is above {CHECKPOINTING_PRESSURE:.0%} of the {available:,.0f} MB available",
            file=sys.stderr,
        )
    return decision


def _shared_runtime(runtime: Runtime, processes: Processes) -> Runtime:
    """One runtime for every process of a run: each on its own device (its GPU), all in rank 0's
    precision (`auto` measures, and two processes measuring at once may disagree)."""
    if processes.world == 1:
        return runtime
    return replace(runtime, device=processes.accelerator.device, precision=processes.broadcast(runtime.precision))


def evaluate(
    run_dir: str | Path, data: str | Path, batch_size: int | None = None, generations: str | Path | None = None
) -> dict[str, Any]:
    """Metrics of a trained run on a data file (what its task reports: for a classifier accuracy,
    macro-F1 and the confusion matrix; for instruction tuning loss, perplexity and exact match).

    Labels must be known to the run. Where the task generates answers (exact match), they are
    written as JSONL to `generations` (default: beside the run, `generations-<data file stem>.jsonl`).
    """
    trained = load_trained(run_dir)
    cfg, task, objective = trained.config, trained.task, trained.objective
    runtime = runtime_for(trained)
    if batch_size is not None:
        runtime = replace(runtime, eval_batch_size=batch_size)
    examples = task.read_examples(str(data), cfg.data)
    if objective.labels:
        check_known_labels(examples, objective.labels, str(data))
    items = task.prepare_eval(trained, objective.encode(examples, "eval"), runtime)
    metrics = evaluate_items(trained.model, objective, items, runtime)
    if "eval" in objective.counts:
        metrics["rows"] = objective.counts["eval"]
    scores, records = task.answers(trained.model, objective, examples, runtime, None)
    metrics.update(scores)
    if records:
        assert trained.run is not None
        out = Path(generations) if generations else trained.run.dir / f"generations-{Path(data).stem}.jsonl"
        write_jsonl(out, records)
        metrics["generations"] = str(out)
    return metrics


def generate(
    runs: RunsArg | Adapters,
    prompts: list[str] | list[list[dict[str, str]]],
    sampling: Sampling | None = None,
    on_token: Any = None,
    adapter: str | None = None,
) -> list[str]:
    """Completions of a run that generates text (sft, dpo, rl) for text prompts or chat conversations
    (`[{role, content}, ...]`), rendered exactly as training rendered its rows.

    `runs` is one run directory, several runs on one base model (directories, `NAME=DIR` strings or
    {name: dir}; see `load_adapters`) of which `adapter` names the one to answer (default: the
    first), or runs already loaded with `load_adapters`, switched without loading anything again.
    """
    trained = _answering(runs, adapter)
    return generate_with(trained, prompts, sampling or Sampling(), runtime_for(trained), on_token)


def generate_file(
    runs: RunsArg | Adapters, data: str | Path, sampling: Sampling | None = None, adapter: str | None = None
) -> list[dict[str, Any]]:
    """{prompt, output} for every row of a data file (completions, if present, are not used); `runs`
    and `adapter` as for `generate`."""
    trained = _answering(runs, adapter)
    prompts = prompt_inputs(read_prompts(data, trained.config.data))
    outputs = generate_with(trained, prompts, sampling or Sampling(), runtime_for(trained))
    shown = [p if isinstance(p, str) else p[-1]["content"] for p in prompts]
    return [{"prompt": p, "output": o} for p, o in zip(shown, outputs, strict=True)]


def predict(
    runs: RunsArg | Adapters,
    texts: list[str] | None = None,
    data: str | Path | None = None,
    adapter: str | None = None,
) -> list[dict[str, Any]]:
    """Predicted label and class probabilities for each input (or each row of a data file).

    For an image-classification run the inputs are image paths, and each result names its `image`.
    `runs` and `adapter` as for `generate`: one run, or several classifiers on one base model.
    """
    if (texts is None) == (data is None):
        raise ConfigError("predict: give either inputs or a data file, not both")
    trained = _answering(runs, adapter)
    _require_output(trained, "label", "predict")
    return trained.task.predict(trained, texts, None if data is None else str(data), runtime_for(trained))


def transcribe(
    run_dir: str | Path, audio: list[str | Path] | None = None, data: str | Path | None = None
) -> list[dict[str, Any]]:
    """The transcript of each clip (audio file paths, or every row of a data file with an audio
    column), from a transcription run: `{audio, text}` per clip."""
    if (audio is None) == (data is None):
        raise ConfigError("transcribe: give either audio files or a data file, not both")
    trained = load_trained(run_dir)
    _require_output(trained, "transcript", "transcribe")
    clips = None if audio is None else [str(a) for a in audio]
    for clip in clips or []:
        if not Path(clip).expanduser().is_file():
            raise ConfigError(f"{clip}: no such audio file")
    return trained.task.predict(trained, clips, None if data is None else str(data), runtime_for(trained))


def score(run_dir: str | Path, prompts: list[str], responses: list[str]) -> list[float]:
    """The reward model's score of each response to its prompt (a reward run)."""
    if len(prompts) != len(responses):
        raise ConfigError(f"score: {len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
    trained = load_trained(run_dir)
    _require_output(trained, "score", "score")
    return trained.task.score(trained, prompts, responses, runtime_for(trained))


@dataclass(frozen=True)
class RunSummary:
    """A run directory as `tunesmith runs ls` shows it."""

    dir: Path
    task: str
    method: str
    finished: bool
    headline: dict[str, float]  # the task's headline metrics on test (else validation) data


def export(
    run_dir: str | Path,
    format: str,
    out: str | Path,
    quantize: str | None = None,
    data: str | Path | None = None,
    rows: int = 8,
) -> Exported:
    """Export a trained run where it runs: `hf` (plain transformers), `peft` (an adapter plain peft
    loads onto the base), `onnx` (onnxruntime; `quantize="int8"`), `gguf` (llama.cpp and Ollama;
    `quantize="q8_0"`), into the new directory `out`, with a model card.

    Every export is checked before it is written: held-out rows of the run (or `rows` rows of `data`)
    go through the trained model and through the artifact loaded by its own library; their logits must
    agree within the format's tolerance, with the same predicted labels and greedy generations.

    Raises:
        ConfigError: a format, quantization or output that does not fit (one line saying why).
        ParityError: the artifact does not match the trained model (nothing is written).
    """
    return export_run(run_dir, format, out, quantize, data, rows)


def run_summaries(parent: str | Path = "runs") -> list[RunSummary]:
    """The runs under `parent`, each with its task, method, status and headline metrics."""
    known = registry.tasks()
    summaries = []
    for run in list_runs(parent):
        cfg = run.config() or {}
        task_name = str(cfg.get("task", "classification"))
        plugin = known.get(task_name)  # None for a task this installation does not have
        method = cfg.get("method", {})
        finished = (run.dir / "eval.json").is_file()
        metrics = read_json(run.dir / "eval.json") if finished else {}
        held = metrics.get("test") or metrics.get("validation") or {}
        keys = plugin.headline if plugin is not None else ()
        headline = {key: float(held[key]) for key in keys if isinstance(held.get(key), int | float)}
        name = method.get("name", "?") if isinstance(method, dict) else str(method)
        summaries.append(RunSummary(run.dir, task_name, name, finished, headline))
    return summaries


def check_data(
    path: str | Path,
    config: str | Path | None = None,
    task: str | None = None,
    validation: str | Path | None = None,
    max_length: int | None = None,
) -> QualityReport:
    """The data quality report of a data file (what `tunesmith data check` prints): with `config`,
    its data settings, thresholds, task and model tokenizer; leakage against `validation`."""
    plugin, data, tokenizer, references = _data_setup(Path(path), task, config, validation, max_length)
    return plugin.check_data(str(path), references, data, tokenizer)


def clean_data(
    path: str | Path,
    out: str | Path,
    config: str | Path | None = None,
    task: str | None = None,
    validation: str | Path | None = None,
    max_length: int | None = None,
) -> QualityReport:
    """Write the rows of `path` that pass the checks to `out`, and every dropped row with its reason to
    `<out stem>.dropped.jsonl`; returns the report (see `check_data`)."""
    plugin, data, tokenizer, references = _data_setup(Path(path), task, config, validation, max_length)
    return plugin.clean_data(str(path), Path(out), references, data, tokenizer)


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


def tune(
    config: str | Path,
    trials: int = 20,
    overrides: list[str] | None = None,
    storage: str | None = None,
    study: str | None = None,
    timeout: float | None = None,
) -> TuneResult:
    """Search the config's `search` space with Optuna: `trials` runs (each a normal run directory),
    each pruned at an evaluation where it falls behind the median of earlier trials. The study is
    kept in `storage` (default SQLite beside the runs), so a later call, or another machine with the
    same storage URL, continues it. Returns the best trial and all trials.

    Raises:
        ConfigError: no `search` section, a bad entry in it, or a metric the evaluation does not report.
    """
    import optuna

    from tunesmith.search import make_pruner, pruning_callback, read_search, suggest, summarize, tracked_trial

    search = read_search(config, overrides or [], storage, study)
    out_dir = Path(search.base["output"]["dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seed = int((search.base.get("train") or {}).get("seed", 0))
    found = optuna.create_study(
        study_name=search.study,
        storage=search.storage,
        direction=search.direction,
        pruner=make_pruner(search.pruner),
        sampler=optuna.samplers.TPESampler(seed=seed),
        load_if_exists=True,
    )

    def objective(trial: Any) -> float:
        name = f"trial-{trial.number}"

        def remember_run(step: int, record: dict[str, Any]) -> None:
            if "run_dir" not in trial.user_attrs:
                trial.set_user_attr("run_dir", str(max(out_dir.glob(f"{name}-*"))))

        cfg = _as_config(search.base, [*suggest(trial, search.space), f"output.name={name}"], {})
        cfg = tracked_trial(cfg, search.study, trial.number)
        result = train(cfg, callbacks=[remember_run, pruning_callback(trial, search.metric)])
        trial.set_user_attr("steps", result.metrics["train"]["steps"])
        held_out = result.metrics.get("validation") or {}
        if search.metric not in held_out:
            raise ConfigError(
                f"tune.metric={search.metric}: not in the validation metrics {sorted(held_out)}; "
                "tune needs a validation split (data.validation) that reports it"
            )
        return float(held_out[search.metric])

    found.optimize(objective, n_trials=trials, timeout=timeout)
    rows = summarize(found)
    best = next((r for r in rows if r["state"] == "complete" and r["number"] == found.best_trial.number), {})
    return TuneResult(search.study, search.storage, best, rows)


def tune_report(config: str | Path, storage: str | None = None, study: str | None = None) -> Path:
    """The HTML report of a study (see `tune`), written beside its runs; returns its path."""
    import optuna

    from tunesmith.search import read_search, write_report

    search = read_search(config, [], storage, study)
    try:
        found = optuna.load_study(study_name=search.study, storage=search.storage)
    except KeyError:
        raise ConfigError(
            f"{config}: no study {search.study!r} in {search.storage}; run `tunesmith tune` first"
        ) from None
    return write_report(found, Path(search.base["output"]["dir"]) / "tune-report.html")


def preference_pairs(
    prompts: str | Path, out: str | Path, policy: str, reward: str, samples: int = 4, sampling: Sampling | None = None
) -> Any:
    """Sample `samples` completions per prompt from `policy` (a run or a model), rank them by `reward`
    (a reward run or module:function) and write the best and worst as a preference pair (JSONL)."""
    from tunesmith.pairs import build_pairs

    return build_pairs(prompts, out, policy, reward, samples, sampling)


# --- the steps of a run ------------------------------------------------------------------------


@dataclass(frozen=True)
class _RunData:
    """A run's plug-ins and data, read before any model is built."""

    task: Task
    method: Method
    splits: Splits
    quality: QualityReport | None
    objective: Any


def _read_data(cfg: RunConfig) -> _RunData:
    """The task and method of `cfg`, its splits (through the data quality gate) and its objective."""
    task, method = build_task(cfg), build_method(cfg.method)
    torch.manual_seed(cfg.train.seed)
    splits = load_splits(cfg.data, cfg.train.seed, lambda s: task.read_examples(s, cfg.data), task.labelled)
    tokenizer = task.load_tokenizer()
    quality = _quality_gate(cfg, task, tokenizer)
    splits = without_unreadable(splits, quality.unreadable if quality else ())
    return _RunData(task, method, splits, quality, task.objective(tokenizer, splits.labels))


def _build_run_model(
    cfg: RunConfig, data: _RunData, processes: Processes | None = None
) -> tuple[torch.nn.Module, list[str], Runtime]:
    """The model with its method applied, the names of what trains, and the runtime (shared by the
    `processes` of a multi-process run), on its device."""
    model, names = build_model(cfg, data.task, data.method, len(data.splits.labels))
    runtime = make_runtime(cfg.train, cfg.eval, model)
    if processes is not None:
        runtime = _shared_runtime(runtime, processes)
    model.to(runtime.device)
    return model, names, runtime


def _encode(
    data: _RunData,
    model: torch.nn.Module,
    runtime: Runtime,
    batch_size: int,
    recorded: dict[str, Any] | None = None,
    agree: Callable[[Any], Any] = lambda x: x,
) -> tuple[list[Any], list[Any] | None, dict[str, Any]]:
    """Training and validation items, encoded and prepared by the task (e.g. DPO's reference), and
    the kernels training uses (training/kernels.py: `recorded` and `agree` as there).

    The kernels are chosen and applied before the task prepares its items: what it computes with the
    model ahead of training (DPO's reference log-probabilities) must come from the kernels the
    policy trains with, or a bf16 policy differs from its own reference before its first step.
    """
    objective, splits = data.objective, data.splits
    train_items = objective.encode(splits.train, "train", pack_rows=True)
    val_items = objective.encode(splits.validation, "validation") if splits.validation else None
    lengths, rows = pass_shape(objective, train_items, batch_size)
    kernels = choose_kernels(model, lengths, rows, runtime, recorded, agree)
    train_items, val_items = data.task.prepare(objective, model, runtime, splits, train_items, val_items)
    return train_items, val_items, kernels


def _quality_gate(cfg: RunConfig, task: Task, tokenizer: Any) -> QualityReport | None:
    """The data quality report of the training data (leakage checked against validation/test files);
    under `data.quality: fail` a breached threshold stops the run here, before any model is loaded."""
    if cfg.data.quality == "off":
        return None
    held_out = [s for s in (cfg.data.validation, cfg.data.test) if isinstance(s, str)]
    report = task.check_data(cfg.data.train, held_out, cfg.data, tokenizer)
    gate(report, cfg.data.quality)
    return report


def _describe_data(splits: Splits, objective: Any) -> dict[str, Any]:
    """plan.json's view of the data: labels, rows per split, and what encoding kept and dropped."""
    rows = {"train": len(splits.train), "replayed": splits.replayed}
    rows |= {"validation": len(splits.validation or []), "test": len(splits.test or [])}
    described: dict[str, Any] = {"labels": splits.labels, "rows": rows}
    if objective.counts:
        described["rows_encoded"] = objective.counts
        report_dropped(objective.counts)
    return described


def _data_setup(
    file: Path, requested: str | None, config: str | Path | None, validation: str | Path | None, max_length: int | None
) -> tuple[Task, Any, Any, list[str]]:
    """The task (`requested`, else the config's, else classification), data config, tokenizer (None
    without a config) and leakage references for checking `file`: from a run config when given (its
    data settings, task and model tokenizer), else defaults."""
    known = list(registry.tasks())
    if requested is not None and requested not in known:
        raise ConfigError(f"--task {requested!r}: use {', '.join(known[:-1])} or {known[-1]}")
    if config is None:  # the task's defaults; no model, so lengths are counted in words
        cfg = load_config({"model": "(none)", "task": requested or "classification", "data": {"train": str(file)}})
        plugin, tokenizer = build_task(cfg), None
        references = [str(validation)] if validation is not None else []
    else:
        cfg = load_config(config)
        if requested is not None and requested != cfg.task:
            raise ConfigError(
                f"--task {requested} but {config} has task: {cfg.task}; leave out --task or fix the config"
            )
        plugin = build_task(cfg)
        tokenizer = plugin.load_tokenizer()
        configured = [s for s in (cfg.data.validation, cfg.data.test) if isinstance(s, str)]
        for source in configured:
            if not Path(source).exists():
                print(f"warning: {source} (from {config}) is not a file; no leakage check against it", file=sys.stderr)
        references = [str(validation)] if validation is not None else [s for s in configured if Path(s).exists()]
    data = cfg.data if max_length is None else cfg.data.model_copy(update={"max_length": max_length})
    return plugin, data, tokenizer, references


def _answering(runs: RunsArg | Adapters, adapter: str | None) -> Trained:
    """The run that answers: `adapter` of loaded runs, or of runs loaded now (one run alone)."""
    if isinstance(runs, Adapters):
        return runs.use(adapter)
    return load_adapters(runs, adapter).use()


def _require_output(trained: Trained, output: str, verb: str) -> None:
    """Refuse a command the run's task does not answer (predict needs labels, score needs scores)."""
    given = trained.task.output
    if given != output:
        what = {"label": "a label", "score": "a score", "text": "text", "transcript": "a transcript"}
        instead = {"label": "predict", "score": "score", "text": "generate or chat", "transcript": "transcribe"}[given]
        raise ConfigError(
            f"{trained.where}: {verb} is for runs that give {what[output]}; this {trained.config.task} run gives "
            f"{what[given]}: use tunesmith {instead}"
        )


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
