"""Methods change the model: which weights train and what is added (DESIGN §4).

Each method lives in its own module with its config section and registers itself by name
(tunesmith.registry). The loop talks to a method only through the `Method` protocol
(tunesmith.plugins) and never asks which method is active.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from tunesmith import registry
from tunesmith.models.classifier import TextClassifier

__all__ = ["BaseMethod", "freeze_backbone", "merge_peft", "method_descriptions", "param_groups"]


class BaseMethod:
    """Defaults for the optional hooks and capabilities; methods override what they need."""

    name = "base"
    default_lr = 1e-4
    tunes_pretrained = False
    frozen_backbone = False
    frozen_blocks = 0
    extra_positions = 0
    virtual_tokens = False
    checkpointing_refusal: str | None = None
    peft_adapter = False
    standard_layers = True

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    def param_groups(self, model: TextClassifier, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        return param_groups(model, lr, head_lr, weight_decay)

    def on_epoch_start(self, model: TextClassifier, epoch: int) -> None:
        return None

    def noop_reason(self, model: TextClassifier) -> str | None:
        return None

    def merge(self, model: TextClassifier) -> None:
        return None


def merge_peft(model: TextClassifier) -> None:
    """Fold a peft adapter on `model.backbone` into its base weights (peft's own merge), leaving the
    plain base model in its place."""
    try:
        model.backbone = model.backbone.merge_and_unload()  # type: ignore[operator]
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        from tunesmith.errors import ConfigError

        raise ConfigError(
            f"the adapter cannot be merged into the base weights ({exc}); export it with --format peft"
        ) from None


def freeze_backbone(model: TextClassifier) -> None:
    """Freeze every backbone weight; the new head stays trainable."""
    for param in model.backbone.parameters():
        param.requires_grad_(False)
    for param in model.head.parameters():
        param.requires_grad_(True)


def method_descriptions() -> dict[str, str]:
    """name -> one-line description, in registration order."""
    return {name: (cls.__doc__ or "").strip().splitlines()[0] for name, cls in registry.methods().items()}


def param_groups(
    model: TextClassifier, lr: float, head_lr: float, weight_decay: float, lr_scale: Any = None
) -> list[dict]:
    """Trainable parameters grouped by (learning rate, weight decay).

    Biases, norm weights and IA3 scaling vectors get no weight decay: decay pulls towards zero,
    which for a scaling vector means switching the layer off, not returning to the base. `lr_scale(name)` may
    give a per-parameter LR multiplier (layer-wise decay).
    """
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        base = head_lr if name.startswith("head.") else lr * (lr_scale(name) if lr_scale else 1.0)
        no_decay = param.ndim < 2 or "norm" in name.lower() or "ia3_l" in name
        decay = 0.0 if no_decay else weight_decay
        groups.setdefault((base, decay), []).append(param)
    return [{"params": ps, "lr": g_lr, "weight_decay": wd} for (g_lr, wd), ps in groups.items()]
