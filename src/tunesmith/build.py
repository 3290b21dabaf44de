"""Config -> model, method and objective: the one place that turns a task name into its parts.

Everything after this (the loop, evaluation, checkpoints) talks to the parts through their
protocols and never asks which task or method is active.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.methods import Method, build_method
from tunesmith.models.causal_lm import base_decoder
from tunesmith.models.image import build_image_classifier, image_preprocessing
from tunesmith.models.load import build_causal_lm, build_classifier, load_tokenizer
from tunesmith.objectives.classification import ClassificationObjective
from tunesmith.objectives.dpo import DpoObjective
from tunesmith.objectives.image_classification import ImageClassificationObjective
from tunesmith.objectives.reward import RewardObjective
from tunesmith.objectives.rewards import load_reward
from tunesmith.objectives.rl import RlObjective
from tunesmith.objectives.sft import SftObjective

__all__ = ["GENERATIVE", "build_model", "build_objective", "prepare_tokenizer", "refuse_noop"]

GENERATIVE = ("sft", "dpo", "rl")  # tasks that tune a causal LM's own output layer (no new head)


def build_model(cfg: RunConfig, num_labels: int) -> tuple[nn.Module, Method, list[str]]:
    """The base model with the method applied, and the names of the parameters that train."""
    method = build_method(cfg.method)
    _check_method_fits(cfg, method)
    if cfg.task in GENERATIVE:
        model: nn.Module = build_causal_lm(cfg.model, cfg.data.max_length)
    elif cfg.task == "image-classification":
        model = build_image_classifier(cfg.model, num_labels, cfg.train.seed)
    else:  # a reward model is a text classifier with one output: the score
        model = build_classifier(cfg.model, 1 if cfg.task == "reward" else num_labels, cfg.train.seed)
    _check_positions(cfg, model, method)
    method.apply(model)  # type: ignore[arg-type]
    if cfg.train.gradient_checkpointing:
        _enable_checkpointing(model, method)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return model, method, names + trained_buffers(model)


def trained_buffers(model: nn.Module) -> list[str]:
    """Buffers that training changes and a run must save with its weights: the running statistics
    of batch norms whose weights train (frozen ones stay in eval mode and keep theirs)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            names += [f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False)]
    return names


def build_objective(cfg: RunConfig, tokenizer: Any, labels: Sequence[str]) -> Any:
    if cfg.task == "sft":
        d = cfg.data
        return SftObjective(tokenizer, d.max_length, d.template, d.train_on_prompt, d.overlong, d.packing)
    if cfg.task == "image-classification":
        return ImageClassificationObjective(labels, image_preprocessing(cfg.model, cfg.data), cfg.data.augment)
    if cfg.task == "reward":
        return RewardObjective(tokenizer, cfg.data.max_length, cfg.data.overlong)
    if cfg.task == "dpo":
        return DpoObjective(tokenizer, cfg.data.max_length, cfg.dpo, cfg.data.template, cfg.data.overlong)
    if cfg.task == "rl":
        reward, record = load_reward(cfg.rl.reward)
        objective = RlObjective(tokenizer, cfg.data.max_length, cfg.rl, reward, cfg.data.template)
        objective.reward_record = record
        return objective
    return ClassificationObjective(tokenizer, labels, cfg.data.max_length)


def prepare_tokenizer(cfg: RunConfig, tokenizer: Any | None = None) -> Any:
    """The model's tokenizer; a causal LM without a pad token pads with EOS (padding is masked by
    the attention mask, so the choice of id does not matter). Image tasks have none."""
    if cfg.task == "image-classification":
        return None
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
    if cfg.task in (*GENERATIVE, "reward") and tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ConfigError(f"model.name={cfg.model.name}: the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def refuse_noop(method: Method, model: nn.Module) -> None:
    reason = method.noop_reason(model)  # type: ignore[arg-type]
    if reason:
        raise ConfigError(f"method.name={method.name}: {reason}; check train.lr, train.epochs and the data")


def _check_method_fits(cfg: RunConfig, method: Method) -> None:
    if cfg.task == "image-classification" and method.name in ("prompt-tuning", "prefix-tuning"):
        raise ConfigError(
            f"method.name={method.name} learns virtual tokens in front of a text input; image models take "
            "pixels, not tokens. Use feature-extraction, partial, lora or full"
        )
    if cfg.task in GENERATIVE and method.frozen_backbone:
        raise ConfigError(
            f"method.name={method.name} trains only a new head, and a causal LM gets none (its output "
            "layer is the pre-trained one, often tied to the input embedding); use lora, partial, adapter, "
            "ia3, prompt-tuning, prefix-tuning or full"
        )
    if cfg.task == "sft" and cfg.data.packing and cfg.method.name in ("prompt-tuning", "prefix-tuning"):
        raise ConfigError(
            f"data.packing with method.name={method.name}: the virtual tokens would be shared by every row "
            "packed into a sequence; turn packing off for prompt and prefix tuning"
        )


def _check_positions(cfg: RunConfig, model: nn.Module, method: Method) -> None:
    backbone = getattr(model, "backbone", model)
    limit = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    needed = cfg.data.max_length + method.extra_positions
    if limit is not None and needed > limit:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} + {method.extra_positions} virtual tokens of method.name="
            f"{method.name} is {needed} positions, but the model has {limit}; lower data.max_length"
        )


def _enable_checkpointing(model: nn.Module, method: Method) -> None:
    if method.name == "prefix-tuning":
        raise ConfigError(
            "train.gradient_checkpointing with method.name=prefix-tuning: the prefix is a cache that "
            "checkpointing cannot recompute; turn one of them off"
        )
    decoder = base_decoder(model.backbone)  # type: ignore[arg-type]
    if not callable(getattr(decoder, "gradient_checkpointing_enable", None)) or not getattr(
        decoder, "supports_gradient_checkpointing", False
    ):
        raise ConfigError(f"train.gradient_checkpointing: {type(decoder).__name__} does not support it")
    # Non-reentrant checkpointing works when the inputs need no gradient (frozen embeddings).
    decoder.gradient_checkpointing_enable(  # type: ignore[operator]
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
