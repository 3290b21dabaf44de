"""RunConfig: the one validated, frozen description of a run (DESIGN §3).

Loaded from YAML, overridden by `key.sub=value` strings or Python keyword arguments, validated
once. Unknown keys are errors with a did-you-mean hint; every error is reported at once with its
path. Defaults live only here and in the plug-ins' own sections: the `method` section is the
registered methods' configs told apart by `name`, and each task may add a section of its own
(`dpo:`, `rl:`); `run_config_type` assembles them from the registries.
"""

from __future__ import annotations

import difflib
import re
import typing
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from tunesmith import registry
from tunesmith.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "DataConfig",
    "DistributedConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "MethodSection",
    "MlflowConfig",
    "ModelConfig",
    "OutputConfig",
    "QualityThresholds",
    "ReplayConfig",
    "RetentionConfig",
    "RunConfig",
    "Section",
    "TensorBoardConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "read_yaml_config",
    "run_config_type",
]


class Section(BaseModel):
    """A config section: frozen, and an unknown key is an error.

    YAML reads a bare `off`, `no` or `false` as a boolean: where a field's documented choices spell
    one of those words (`data.quality: off`), the boolean is taken as that word.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _yaml_words(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        fixed = dict(values)
        for key, value in values.items():
            field = cls.model_fields.get(key)
            if isinstance(value, bool) and field is not None:
                word = _spelled(field.annotation, value)
                if word is not None:
                    fixed[key] = word
        return fixed


def _spelled(annotation: Any, value: bool) -> str | None:
    """The choice of a Literal field that YAML turns into `value` (off/no/false or on/yes/true)."""
    if typing.get_origin(annotation) is not Literal:
        return None
    words = ("on", "yes", "true") if value else ("off", "no", "false")
    return next((w for w in typing.get_args(annotation) if isinstance(w, str) and w.lower() in words), None)


class MethodSection(Section):
    """The base of every method's config section (each lives beside its method, tunesmith/methods/)."""

    name: str


class ModelConfig(Section):
    """The pre-trained model to start from."""

    name: str = Field(
        description="Packaged short name (minilm-l6, smollm2-135m, efficientnet-lite0, whisper-tiny-en), local "
        "directory, .gguf file, or hub id."
    )
    pretrained: bool = Field(
        True, description="Start from the pre-trained weights; false: the same network, randomly initialised."
    )
    pooling: Literal["mean", "cls", "last"] = Field(
        "mean",
        description="How token states become one vector for the head (last: the final real token, for decoders).",
    )
    head_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="Dropout before the new head.")
    revision: str | None = Field(None, description="Hub revision (only for hub ids).")
    attention: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="Causal LMs' attention kernel; auto: the one a short probe measures faster (or as fast "
        "and leaner) on this machine at the run's shapes, cached per machine.",
    )


class QualityThresholds(Section):
    """Limits of the data quality gate (data/quality.py); a breach fails or warns per `data.quality`.
    Counts are rows; shares are fractions of the rows checked."""

    near_duplicate_jaccard: float = Field(
        0.8, gt=0.0, le=1.0, description="Word-shingle Jaccard similarity from which two texts are near duplicates."
    )
    max_schema_errors: int = Field(0, ge=0, description="Rows that cannot be read as the task's records.")
    max_empty: int = Field(0, ge=0, description="Empty or whitespace-only texts.")
    max_duplicate_share: float = Field(
        0.05, ge=0.0, le=1.0, description="Exact duplicate rows (copies beyond the first)."
    )
    max_near_duplicate_share: float = Field(0.1, ge=0.0, le=1.0, description="Near-duplicate rows.")
    max_conflicting: int = Field(0, ge=0, description="Texts that appear with more than one label.")
    max_leakage: int = Field(0, ge=0, description="Validation/test rows equal or near-equal to a training row.")
    max_unreadable: int = Field(
        0, ge=0, description="Images or audio clips that cannot be opened or decoded (skipped under warn)."
    )
    max_silent: int = Field(0, ge=0, description="Audio clips without sound (peak below -60 dBFS).")
    min_class_share: float = Field(0.0, ge=0.0, lt=1.0, description="Smallest label's share of the rows.")
    max_overlong_share: float = Field(
        0.05, ge=0.0, le=1.0, description="Rows longer than data.max_length (audio: clips over data.max_seconds)."
    )
    max_untrainable: int = Field(0, ge=0, description="sft: rows whose loss mask leaves no trained token.")
    max_role_order: int = Field(0, ge=0, description="sft: conversations with roles out of order.")


class ReplayConfig(Section):
    """Mix rows of a retention set into training, against forgetting (experience replay)."""

    path: str = Field(description="Rows in the task's format (sft: also plain {text}), or a packaged data name.")
    fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of each epoch's training rows drawn from it.")


class AugmentConfig(Section):
    """Train-time image augmentation, drawn from the run's seed (evaluation never augments)."""

    crop_scale: tuple[float, float] = Field(
        (0.35, 1.0), description="Random resized crop: share of the image area kept, from..to (1, 1: no crop)."
    )
    crop_ratio: tuple[float, float] = Field((0.75, 4 / 3), description="Random resized crop: aspect ratio range.")
    hflip: bool = Field(True, description="Flip horizontally with probability 0.5 (off for digits and text).")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for name in ("crop_scale", "crop_ratio"):
            low, high = getattr(self, name)
            if not 0 < low <= high or (name == "crop_scale" and high > 1):
                raise ValueError(f"{name} must be 0 < from <= to{' <= 1' if name == 'crop_scale' else ''}")
        return self


class DataConfig(Section):
    """Where the records come from and which fields hold what."""

    train: str = Field(description="Training file (JSONL, JSON, CSV, Parquet) or packaged data name.")
    validation: str | float | None = Field(
        0.1, description="A file, or a fraction of train split off by a stable, stratified hash."
    )
    test: str | None = Field(None, description="An optional held-out file, evaluated once at the end.")
    text_field: str = Field("text", description="Field holding the text.")
    image_field: str = Field(
        "image", description="image-classification: field holding the image (a path, bytes or {bytes, path})."
    )
    image_size: int | None = Field(
        None, gt=7, description="image-classification: side of the square input (default: the model's own)."
    )
    augment: AugmentConfig | None = Field(
        None, description="image-classification: train-time augmentation (default: none, so features can be cached)."
    )
    audio_field: str = Field(
        "audio",
        description="audio-classification, transcription: field holding the clip (a path, {bytes, path} or "
        "{array, sampling_rate}).",
    )
    max_seconds: float | None = Field(
        None,
        gt=0,
        le=30,
        description="audio-classification, transcription: longest clip, in seconds; the speech encoder is cut "
        "to it, so short clips cost little (default: the longest training clip, rounded up).",
    )
    text_pair_field: str | None = Field(None, description="Second text for pair tasks (NLI, QA).")
    label_field: str = Field("label", description="Field holding the label (string or integer).")
    labels: list[str] | None = Field(None, description="Label order (default: sorted labels seen in train).")
    label_map: dict[str, str] = Field(default_factory=dict, description="Rename labels, e.g. fresh: positive.")
    column_map: dict[str, str] = Field(default_factory=dict, description="Rename fields: {file_name: our_name}.")
    max_length: int = Field(128, gt=1, description="Longest token sequence; longer rows follow `overlong`.")
    overlong: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="Rows longer than max_length: cut them, leave them out, or stop (counted)."
    )
    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="sft: render rows with the tokenizer's chat template (auto: when it has one), or plain text.",
    )
    train_on_prompt: bool = Field(False, description="sft: also train on prompt tokens, not only completions.")
    packing: bool = Field(
        False, description="sft: pack short rows into max_length sequences (each row attends only to itself)."
    )
    limit: int | None = Field(None, gt=0, description="Use a reproducible sample of this many training rows.")
    few_shot: int | None = Field(
        None, gt=0, description="Train on K rows per label, chosen reproducibly from train.seed (classification)."
    )
    replay: ReplayConfig | None = Field(None, description="Mix a retention set into training batches.")
    quality: Literal["fail", "warn", "off"] = Field(
        "warn", description="The data quality gate before training: stop on a breached threshold, warn, or skip."
    )
    thresholds: QualityThresholds = Field(default_factory=QualityThresholds, description="Limits of the gate.")

    @field_validator("validation")
    @classmethod
    def _fraction(cls, v: str | float | None) -> str | float | None:
        if isinstance(v, float) and not 0.0 < v < 1.0:
            raise ValueError("a fraction must be between 0 and 1 (exclusive), or give a file path")
        return v


class EarlyStoppingConfig(Section):
    metric: str | None = Field(
        None, description="Validation metric to watch (default: eval.metric; accuracy, macro_f1, loss, perplexity)."
    )
    patience: int = Field(2, gt=0, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class DistributedConfig(Section):
    """How the processes of a multi-process run (`tunesmith train --nproc N`) share the work."""

    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="ddp: every process holds the whole model, gradients are averaged; fsdp: weights, "
        "gradients and optimizer state sharded over the processes (for a model that does not fit one device).",
    )
    find_unused_parameters: bool = Field(
        False, description="ddp: allow trainable parameters that a forward pass does not use (slower)."
    )
    reshard_after_forward: bool = Field(
        True, description="fsdp: free a block's gathered weights after its forward pass (ZeRO-3; false: ZeRO-2)."
    )
    cpu_offload: bool = Field(False, description="fsdp on GPUs: keep the shards in CPU memory between uses.")


class TensorBoardConfig(Section):
    """TensorBoard event files of a run (when `train.report_to` lists tensorboard)."""

    log_dir: str | None = Field(
        None,
        description="Directory of the event files (default: `<run dir>/tensorboard`, so `tensorboard --logdir runs` "
        "shows every run).",
    )


class MlflowConfig(Section):
    """The run as an MLflow run (when `train.report_to` lists mlflow)."""

    tracking_uri: str | None = Field(
        None,
        description="Tracking server URL or database (default: `sqlite:///<output.dir>/mlflow.db`); a local SQLite "
        "store keeps the artifacts in `mlartifacts/` beside its file.",
    )
    experiment: str | None = Field(
        None,
        description="Experiment name (default: output.name, else `<task>-<method>`; a tune trial: the study's name).",
    )
    run_name: str | None = Field(None, description="Run name (default: the run directory's name).")
    tags: dict[str, str] = Field(default_factory=dict, description="Tags set on the run (tune adds study and trial).")
    artifacts: bool = Field(True, description="Log the run directory as the run's artifacts when it ends.")
    max_artifact_mb: float | None = Field(
        100.0,
        gt=0,
        description="Files above this size stay out of the artifacts, e.g. full-model weights (null: no limit); "
        "`checkpoints/` is never logged.",
    )


class TrainConfig(Section):
    """Optimisation, the loop's schedule, and where its metrics are reported."""

    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: float | Literal["auto"] | None = Field(
        None,
        description="Peak learning rate; auto: a range test picks it before training (default: the method's "
        "own, scaled by the model family's pretrained_lr_scale where the method trains pre-trained weights).",
    )
    head_lr: float | None = Field(
        None,
        description="LR of the new head (default: max(lr, 2e-3) where the method trains pre-trained weights, "
        "else lr; with lr: auto, the same rule on the rate the range test picks).",
    )
    lr_multiplier: float = Field(
        1.0,
        gt=0,
        description="Multiplies lr and head_lr, however they were chosen (the service's learning_rate_multiplier).",
    )
    lr_find_steps: int = Field(
        100, ge=10, le=1000, description="Steps of the learning-rate range test that `auto` runs (1e-7 to 1)."
    )
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (not on biases and norms).")
    batch_size: int = Field(32, gt=0, description="Rows per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (null = off).")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="LR after the warmup: linear or cosine decay to 0, or constant."
    )
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, description="Share of steps spent warming the LR up.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="bf16 autocast with fp32 master weights where the hardware has bf16 (auto)."
    )
    seed: int = Field(42, description="Seeds the head, the data order and dropout.")
    group_by_length: bool = Field(True, description="Batch rows of similar length to cut padding.")
    eval_every: int | None = Field(None, gt=0, description="Validate every N steps (default: each epoch).")
    save_every: int | None = Field(None, gt=0, description="Checkpoint every N steps (default: each eval).")
    log_every: int = Field(10, gt=0, description="Write a metrics.jsonl line every N steps.")
    early_stopping: EarlyStoppingConfig | None = Field(
        None, description="Stop when validation stops improving, and keep the best weights."
    )
    cache_max_mb: int = Field(1024, gt=0, description="Cached frozen features above this spill to disk.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice).")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="Recompute block activations in the backward pass: less memory, ~30% more compute. auto turns "
        "it on when the run's estimated peak memory (tunesmith plan's estimate, from the model's shapes at the "
        "largest batch) is above 80% of the memory available as training starts, where the model and method "
        "allow it; plan.json records the decision and its numbers.",
    )
    trim_memory_every: int | Literal["auto"] = Field(
        "auto",
        description="Hand the memory a training forward pass frees back to the OS after every N transformer blocks "
        "(glibc malloc_trim, CPU only; 0 = never). auto trims after a block once resident memory grew 1 GB since "
        "the pass began or last trimmed, or 256 MB while under a quarter of the machine's memory is available: "
        "SmolLM2 LoRA SFT at 8 x 512 tokens peaked at 7.5 GB instead of 14.2 (see the README).",
    )
    distributed: DistributedConfig | None = Field(
        None, description="Multi-process runs: the strategy (default ddp); the process count is --nproc."
    )
    report_to: list[Literal["tensorboard", "mlflow"]] = Field(
        default_factory=list, description="Experiment trackers that also receive every logged metric and the config."
    )
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig, description="TensorBoard settings.")
    mlflow: MlflowConfig = Field(default_factory=MlflowConfig, description="MLflow settings.")

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_tracker(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v  # `report_to: mlflow` is a list of one

    @field_validator("lr", "head_lr", mode="before")
    @classmethod
    def _rate(cls, value: Any, info: ValidationInfo) -> Any:
        """A positive number, `auto` (lr only) or null. YAML reads `5e-5` (no dot) as a string: it is
        taken as the number it spells."""
        if value == "auto" and info.field_name == "head_lr":
            raise ValueError(
                "auto is for train.lr; leave head_lr unset and the head follows lr by the default rule "
                "(max(lr, 2e-3) where the method trains pre-trained weights, else lr)"
            )
        if value is None or value == "auto":
            return value
        auto = ", or auto (a short range test picks it before training)" if info.field_name == "lr" else ""
        number = _as_number(value)
        if number is None:
            raise ValueError(f"{value!r} is not a learning rate; give a number (e.g. 5.0e-5){auto}")
        if not 0 < number < float("inf"):
            raise ValueError(f"must be greater than 0 and finite (got {value}){auto}")
        return number

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing(cls, value: Any) -> Any:
        """`auto`, true or false (YAML's spellings of them too)."""
        spelled = str(value).lower() if isinstance(value, str) else value
        choices = {"auto": "auto", "true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}
        if isinstance(value, bool):
            return value
        if not isinstance(spelled, str) or spelled not in choices:
            raise ValueError(f"{value!r}: give auto, true or false")
        return choices[spelled]

    @field_validator("trim_memory_every", mode="before")
    @classmethod
    def _every(cls, value: Any) -> Any:
        """`auto`, or a whole number of blocks (0 = never)."""
        number = _as_number(value)
        if value == "auto":
            return value
        if number is None or number < 0 or number != int(number):
            raise ValueError(f"{value!r}: give auto, 0 (never) or a whole number of blocks, e.g. 3")
        return int(number)


def _as_number(value: Any) -> float | None:
    """A float from a number or a string spelling one; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value) if isinstance(value, str) else None
    except ValueError:
        return None


class RetentionConfig(Section):
    """Measure what the base model knew, before training and at every evaluation (forgetting)."""

    data: str | None = Field(
        None, description="Rows in the task's format, or a packaged name (default for causal LMs: hamlet)."
    )
    metric: Literal["perplexity", "accuracy"] = Field("perplexity", description="How knowledge is measured.")
    max_drop: float | None = Field(
        None,
        gt=0.0,
        description="Largest relative change for the worse (0.1 = 10%); past it, stop and keep the best within it.",
    )
    max_rows: int = Field(256, gt=0, description="Rows (or text chunks) of the retention set used.")


class EvalConfig(Section):
    batch_size: int = Field(64, gt=0, description="Rows per evaluation batch.")
    baseline: bool = Field(False, description="Also evaluate before training (new head untrained).")
    metric: str | None = Field(
        None, description="Metric that picks the best checkpoint (default: accuracy; loss for sft)."
    )
    samples: int = Field(3, ge=0, description="sft: validation prompts generated and logged at each evaluation.")
    max_new_tokens: int = Field(64, gt=0, description="sft: longest generated answer in evaluation.")
    exact_match_rows: int | None = Field(
        200, gt=0, description="sft: validation/test rows answered greedily for exact match (null = all)."
    )
    retention: RetentionConfig | None = Field(None, description="Measure forgetting of what the base model knew.")


class OutputConfig(Section):
    dir: str = Field("runs", description="Parent directory of run directories.")
    name: str | None = Field(None, description="Run name (default: <task>-<method>).")


class RunConfig(Section):
    """A whole run. `model`, `method` and `output` accept a plain string as shorthand.

    This class holds the core sections; `run_config_type()` is the class every config is validated
    with: it adds the registered methods (`method` is one of their configs, by `name`), the registered
    task names and each task's own section.
    """

    model: ModelConfig
    task: str = Field("classification", description="What the model learns to do (a registered task).")
    method: MethodSection = Field(description="How the model changes (a registered method), e.g. {name: lora, r: 8}.")
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = dict(values)
        for key, field in (("model", "name"), ("method", "name"), ("output", "dir")):
            if isinstance(values.get(key), str):
                values[key] = {field: values[key]}
        return values

    def section(self, name: str) -> Any:
        """A task's own section (e.g. `dpo`), as its config class."""
        return getattr(self, _attribute(name))

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML (the resolved config saved with each run)."""
        return self.model_dump(mode="json", by_alias=True)


DEFAULT_METHOD = "lora"


def run_config_type() -> type[RunConfig]:
    """The RunConfig class for the registered plug-ins: `method` a union of their configs told apart
    by `name`, `task` one of their names, plus one field per task section."""
    methods, tasks = registry.methods(), registry.tasks()
    return _assemble(
        tuple((name, cls.config) for name, cls in methods.items()),
        tuple((name, cls.section, cls.summary) for name, cls in tasks.items()),
    )


def _attribute(name: str) -> str:
    return name.replace("-", "_")


@cache
def _assemble(
    methods: tuple[tuple[str, type[MethodSection]], ...], tasks: tuple[tuple[str, type[Section] | None, str], ...]
) -> type[RunConfig]:
    configs = tuple(config for _, config in methods)
    union = Annotated[Union[configs], Field(discriminator="name")]  # type: ignore[valid-type]  # noqa: UP007
    task_names = Literal[tuple(name for name, _, _ in tasks)]  # type: ignore[valid-type]
    described = "; ".join(f"{name} ({summary})" for name, _, summary in tasks)
    fields: dict[str, Any] = {
        "task": (task_names, Field("classification", description=f"What the model learns: {described}.")),
        "method": (union, Field(default_factory=dict(methods)[DEFAULT_METHOD], description="How the model changes.")),
    }
    for name, section, _ in tasks:
        if section is not None:  # `<task name>:` in the YAML (an attribute of the same name, - as _)
            described = f"task {name}: {section.__doc__}"
            fields[_attribute(name)] = (section, Field(default_factory=section, alias=name, description=described))
    return create_model("RunConfig", __base__=RunConfig, __module__=__name__, **fields)  # type: ignore[call-overload,no-any-return]


# --- loading, overriding, error reporting ----------------------------------------------------


def load_config(source: str | Path | dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file (or a dict), apply `key.sub=value` overrides, validate once.

    Raises:
        ConfigError: listing every problem, each with its config path.
    """
    if isinstance(source, dict):
        data, origin = dict(source), "config"
    else:
        data, origin = read_yaml_config(source), str(source)
    return config_from_dict(apply_overrides(data, overrides or []), origin=origin)


def read_yaml_config(source: str | Path) -> dict[str, Any]:
    """The raw mapping in a YAML config file (not yet validated)."""
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, data:, ...)")
    return data


def config_from_dict(data: dict[str, Any], origin: str = "config") -> RunConfig:
    """Validate a config mapping (every problem reported at once, each with its path)."""
    try:
        return run_config_type().model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, origin)) from None


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `a.b.c=value` set (value parsed as YAML)."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.sub=value, e.g. train.lr=1e-4")
        value = yaml.safe_load(raw) if raw.strip() else None
        parts = key.strip().split(".")
        method = out.get("method")
        if parts == ["method", "name"] and isinstance(method, dict) and method.get("name") != value:
            out["method"] = {}  # another method: the old method's options do not apply to it
        set_path(out, parts, value)
    return out


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set a nested key, expanding string shorthands (`method: lora`) into mappings."""
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if isinstance(child, str) and part in ("model", "method", "output"):
            child = {{"model": "name", "method": "name", "output": "dir"}[part]: child}
        if child is None:
            child = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is not a section")
        node[part] = child
        node = child
    node[parts[-1]] = value


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _format_errors(exc: ValidationError, origin: str) -> str:
    methods = registry.methods()
    lines = [f"{origin}: {exc.error_count()} problem(s):"]
    for err in exc.errors():
        raw = [str(p) for p in err["loc"]]
        loc = [p for p in raw if p not in methods]  # leave out the union's tag (the method's name)
        path = ".".join(loc) or "(top level)"
        lines.append(f"  {path}: {_explain(err, raw, methods)}")
    return "\n".join(lines)


def _explain(err: Any, raw_loc: list[str], methods: dict[str, Any]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        known = _known_fields(raw_loc[:-1], methods)
        return f"unknown key{_did_you_mean(raw_loc[-1], known)} (known: {', '.join(sorted(known))})"
    if kind == "union_tag_invalid":
        bad = str(err.get("input", {}).get("name", "?")) if isinstance(err.get("input"), dict) else "?"
        return f"unknown method '{bad}'{_did_you_mean(bad, list(methods))} (choose from {', '.join(methods)})"
    if kind == "missing":
        return "required, but not given"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return msg.replace("Input should be", "must be")
    if kind == "literal_error":
        given = err.get("input")
        choices = re.findall(r"'([^']*)'", str((err.get("ctx") or {}).get("expected", "")))
        hint = _did_you_mean(given, choices) if isinstance(given, str) else ""
        return f"{msg.replace('Input should be', 'must be')} (got {given!r}){hint}"
    return msg.removeprefix("Value error, ")


def _did_you_mean(given: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(given, known, n=1)
    return f"; did you mean '{hint[0]}'?" if hint else ""


def _known_fields(raw_loc: list[str], methods: dict[str, Any]) -> list[str]:
    """The field names valid at `raw_loc` (which includes the method's tag), from the schema."""
    model: Any = run_config_type()
    for part in raw_loc:
        if part in methods:
            model = methods[part].config
            continue
        fields = getattr(model, "model_fields", {})
        field = fields.get(part) or fields.get(_attribute(part))  # a task section's key may hold a -
        if field is None:
            return []
        model = _first_model(field.annotation)
    return list(getattr(model, "model_fields", {}))


def _first_model(annotation: Any) -> Any:
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return annotation
