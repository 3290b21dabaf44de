"""RunConfig: the one validated, frozen description of a run (DESIGN §3).

Loaded from YAML, overridden by `key.sub=value` strings or Python keyword arguments, validated
once. Unknown keys are errors with a did-you-mean hint; every error is reported at once with its
path. Defaults live only here.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunesmith.errors import ConfigError

__all__ = [
    "AdapterConfig",
    "AugmentConfig",
    "DataConfig",
    "DpoConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "FeatureExtractionConfig",
    "FullConfig",
    "IA3Config",
    "LoraConfig",
    "MethodConfig",
    "ModelConfig",
    "OutputConfig",
    "PartialConfig",
    "PrefixTuningConfig",
    "PromptTuningConfig",
    "RlConfig",
    "RunConfig",
    "TaskName",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "read_yaml_config",
]


TaskName = Literal["classification", "image-classification", "sft", "reward", "dpo", "rl"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Section):
    """The pre-trained model to start from."""

    name: str = Field(
        description="Packaged short name (minilm-l6, smollm2-135m, efficientnet-lite0), local directory, .gguf file, "
        "or hub id."
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
        description="Causal LMs' attention kernel; auto: eager on CPU up to 512 tokens (measured faster), else sdpa.",
    )


# --- methods: one config per method, told apart by `name` ------------------------------------


class FullConfig(_Section):
    """Train every weight."""

    name: Literal["full"] = "full"
    layer_lr_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="Multiply the LR by this for each block below the top (1 = off)."
    )


class FeatureExtractionConfig(_Section):
    """Train only the new head on frozen (cached) backbone features."""

    name: Literal["feature-extraction"] = "feature-extraction"


class PartialConfig(_Section):
    """Freeze the embeddings and the bottom blocks (or train only parameters matching a regex)."""

    name: Literal["partial"] = "partial"
    freeze_layers: int | None = Field(
        None, ge=0, description="Freeze embeddings + the bottom K blocks (default: all but the top 2)."
    )
    trainable_regex: str | None = Field(
        None, description="Train only parameters whose name matches this regex (plus the head)."
    )
    unfreeze_every: int | None = Field(
        None, gt=0, description="Gradual unfreezing: unfreeze one more block (top down) every N epochs."
    )
    layer_lr_decay: float = Field(1.0, gt=0.0, le=1.0, description="Discriminative LR per block.")

    @model_validator(mode="after")
    def _one_selector(self) -> PartialConfig:
        if self.trainable_regex is not None:
            if self.freeze_layers is not None:
                raise ValueError("set freeze_layers or trainable_regex, not both")
            if self.unfreeze_every is not None or self.layer_lr_decay < 1:
                raise ValueError(
                    "unfreeze_every and layer_lr_decay work on blocks; they cannot combine with trainable_regex"
                )
        return self


class LoraConfig(_Section):
    """Low-rank updates beside chosen linear layers (Hu et al. 2021), through peft."""

    name: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="Rank of the update.")
    alpha: int = Field(16, gt=0, description="Scale: the update is multiplied by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt (default: every linear layer inside the blocks)."
    )
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")


class AdapterConfig(_Section):
    """Bottleneck adapters after attention and feed-forward outputs (Houlsby et al. 2019)."""

    name: Literal["adapter"] = "adapter"
    bottleneck: int = Field(64, gt=0, description="Width of the down-projection.")
    activation: Literal["relu", "gelu", "tanh"] = Field("relu", description="Nonlinearity in the bottleneck.")
    target_modules: list[str] | None = Field(
        None, description="Output projections to wrap (default: attention and FFN outputs)."
    )


class PromptTuningConfig(_Section):
    """Learned soft-prompt vectors prepended to the input (Lester et al. 2021), through peft."""

    name: Literal["prompt-tuning"] = "prompt-tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Length of the soft prompt.")
    init_text: str | None = Field(None, description="Initialise the prompt from this text's embeddings.")


class PrefixTuningConfig(_Section):
    """Learned per-layer key/value prefixes (Li & Liang 2021), through peft."""

    name: Literal["prefix-tuning"] = "prefix-tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Length of the prefix at every layer.")
    projection: bool = Field(False, description="Reparameterise prefixes through an MLP while training.")


class IA3Config(_Section):
    """Learned scaling vectors on keys, values and FFN activations (Liu et al. 2022), through peft."""

    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(None, description="Modules to scale (default: keys, values, FFN out).")
    feedforward_modules: list[str] | None = Field(None, description="Which targets scale their input (FFN).")


MethodConfig = Annotated[
    FullConfig
    | FeatureExtractionConfig
    | PartialConfig
    | LoraConfig
    | AdapterConfig
    | PromptTuningConfig
    | PrefixTuningConfig
    | IA3Config,
    Field(discriminator="name"),
]

METHOD_NAMES = (
    "full",
    "feature-extraction",
    "partial",
    "lora",
    "adapter",
    "prompt-tuning",
    "prefix-tuning",
    "ia3",
)


class QualityThresholds(_Section):
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
    max_unreadable: int = Field(0, ge=0, description="Images that cannot be opened or decoded (skipped under warn).")
    min_class_share: float = Field(0.0, ge=0.0, lt=1.0, description="Smallest label's share of the rows.")
    max_overlong_share: float = Field(0.05, ge=0.0, le=1.0, description="Rows longer than data.max_length.")
    max_untrainable: int = Field(0, ge=0, description="sft: rows whose loss mask leaves no trained token.")
    max_role_order: int = Field(0, ge=0, description="sft: conversations with roles out of order.")


class ReplayConfig(_Section):
    """Mix rows of a retention set into training, against forgetting (experience replay)."""

    path: str = Field(description="Rows in the task's format (sft: also plain {text}), or a packaged data name.")
    fraction: float = Field(0.1, gt=0.0, lt=1.0, description="Share of each epoch's training rows drawn from it.")


class AugmentConfig(_Section):
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


class DataConfig(_Section):
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


class EarlyStoppingConfig(_Section):
    metric: str | None = Field(
        None, description="Validation metric to watch (default: eval.metric; accuracy, macro_f1, loss, perplexity)."
    )
    patience: int = Field(2, gt=0, description="Evaluations without improvement before stopping.")
    min_delta: float = Field(0.0, ge=0.0, description="Smallest change that counts as an improvement.")


class TrainConfig(_Section):
    """Optimisation and the loop's schedule."""

    epochs: float = Field(3, gt=0, description="Passes over the training data.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    lr: float | None = Field(None, gt=0, description="Peak learning rate (default: the method's own).")
    head_lr: float | None = Field(None, gt=0, description="LR of the new head (default: lr).")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay (not on biases and norms).")
    batch_size: int = Field(32, gt=0, description="Rows per micro-batch.")
    grad_accum: int = Field(1, gt=0, description="Micro-batches per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip gradients to this norm (null = off).")
    scheduler: Literal["linear", "cosine", "constant"] = Field("linear", description="LR decay after warmup.")
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
    gradient_checkpointing: bool = Field(
        False, description="Recompute block activations in the backward pass: less memory, ~30% more compute."
    )


class RetentionConfig(_Section):
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


class EvalConfig(_Section):
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


class DpoConfig(_Section):
    """Direct preference optimisation (task: dpo) against the frozen base model as the reference."""

    beta: float = Field(0.1, gt=0.0, description="KL strength: how far the policy may move from the reference.")
    loss_type: Literal["sigmoid", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, or simpo (reference-free, length-normalised)."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed share of flipped preference labels (cDPO; sigmoid and simpo)."
    )
    gamma: float = Field(0.5, ge=0.0, description="simpo: target reward margin.")


class RlConfig(_Section):
    """Reinforcement learning from a reward (task: rl): sample a group of completions per prompt, score
    them, and move towards the better ones of each group, held near the base model by a KL penalty."""

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


class OutputConfig(_Section):
    dir: str = Field("runs", description="Parent directory of run directories.")
    name: str | None = Field(None, description="Run name (default: <task>-<method>).")


class RunConfig(_Section):
    """A whole run. `model`, `method` and `output` accept a plain string as shorthand."""

    model: ModelConfig
    task: TaskName = Field(
        "classification",
        description="classification (text -> label), image-classification (image -> label), sft "
        "(instruction tuning a causal LM), reward (a scalar score learned from preference pairs), dpo "
        "(a causal LM tuned on preference pairs) or rl (a causal LM tuned online from a reward).",
    )
    method: MethodConfig = Field(default_factory=lambda: LoraConfig())
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    dpo: DpoConfig = Field(default_factory=DpoConfig)
    rl: RlConfig = Field(default_factory=RlConfig)
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

    def to_dict(self) -> dict[str, Any]:
        """Plain data for YAML (the resolved config saved with each run)."""
        return self.model_dump(mode="json")


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
    try:
        return RunConfig.model_validate(data)
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
    lines = [f"{origin}: {exc.error_count()} problem(s):"]
    for err in exc.errors():
        raw = [str(p) for p in err["loc"]]
        loc = [p for p in raw if not _is_union_tag(p)]
        path = ".".join(loc) or "(top level)"
        lines.append(f"  {path}: {_explain(err, raw)}")
    return "\n".join(lines)


def _is_union_tag(part: Any) -> bool:
    return isinstance(part, str) and part in METHOD_NAMES


def _explain(err: Any, raw_loc: list[str]) -> str:
    kind, msg = err["type"], err["msg"]
    if kind == "extra_forbidden":
        known = _known_fields(raw_loc[:-1])
        loc = raw_loc
        hint = difflib.get_close_matches(loc[-1], known, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"unknown key{suggestion} (known: {', '.join(sorted(known))})"
    if kind == "union_tag_invalid":
        bad = str(err.get("input", {}).get("name", "?")) if isinstance(err.get("input"), dict) else "?"
        hint = difflib.get_close_matches(bad, METHOD_NAMES, n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        return f"unknown method '{bad}'{suggestion} (choose from {', '.join(METHOD_NAMES)})"
    if kind == "missing":
        return "required, but not given"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return msg.replace("Input should be", "must be")
    if kind == "literal_error":
        return f"{msg.replace('Input should be', 'must be')} (got {err.get('input')!r})"
    return msg.removeprefix("Value error, ")


def _known_fields(raw_loc: list[str]) -> list[str]:
    """The field names valid at `raw_loc` (which includes the method's tag), from the schema."""
    model: Any = RunConfig
    for part in raw_loc:
        if _is_union_tag(part):
            model = _METHOD_BY_NAME[part]
            continue
        fields = getattr(model, "model_fields", {})
        if part not in fields:
            return []
        model = _first_model(fields[part].annotation)
    return list(getattr(model, "model_fields", {}))


def _first_model(annotation: Any) -> Any:
    for candidate in getattr(annotation, "__args__", (annotation,)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return annotation


_METHOD_BY_NAME: dict[str, type[BaseModel]] = {
    "full": FullConfig,
    "feature-extraction": FeatureExtractionConfig,
    "partial": PartialConfig,
    "lora": LoraConfig,
    "adapter": AdapterConfig,
    "prompt-tuning": PromptTuningConfig,
    "prefix-tuning": PrefixTuningConfig,
    "ia3": IA3Config,
}
