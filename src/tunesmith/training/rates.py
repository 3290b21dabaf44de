"""The learning rates a run trains at when its config leaves them open (README, "Learning rates").

- `train.lr`: the method's own `default_lr`, times the model family's `pretrained_lr_scale` where
  the method moves pre-trained weights themselves (full, partial). Methods that train only weights
  they add (LoRA, adapters, prompts, IA3) or the head alone keep their own rate: it was chosen for
  those new weights, whatever the network under them.
- `train.head_lr`: where the method moves pre-trained weights, the new head trains at
  max(lr, HEAD_LR), HEAD_LR being the rate a new head trains at alone on frozen features (feature
  extraction's default). The head starts from random weights and its job is the same whatever
  trains below it, so it needs its own rate, not the small one that suits pre-trained weights
  (5e-5 for a transformer: the head barely moves in a short run). Measured against a fixed 10x lr:
  as good or better on both packaged sets, and 10x made EfficientNet-Lite0 worse (README). Where
  only new weights train, the head trains at lr, as they all do.
- `train.lr: auto`: a range test (training/lr_find.py) picks lr; the head follows the same rule.

A number in the config always wins.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["HEAD_LR", "Rates", "default_lr", "head_lr_for", "resolve_rates"]

HEAD_LR = 2e-3  # a new linear head on frozen features: feature extraction's default rate


@dataclass(frozen=True)
class Rates:
    """The rates a run trains at, and in words how they were chosen (plan.json's `lr_rule`)."""

    lr: float
    head_lr: float
    rule: str


def default_lr(method_lr: float, tunes_pretrained: bool, family_scale: float) -> tuple[float, str]:
    """The rate `train.lr` defaults to, and the rule that gave it.

    Args:
        method_lr: the method's own `default_lr`.
        tunes_pretrained: whether the method moves pre-trained weights themselves (full, partial).
        family_scale: the model's `pretrained_lr_scale` (1 for transformers).
    """
    if not tunes_pretrained or family_scale == 1.0:
        return method_lr, f"the method's default {method_lr:g}"
    lr = method_lr * family_scale
    return lr, f"the method's default {method_lr:g} x the model family's pretrained_lr_scale {family_scale:g}"


def head_lr_for(lr: float, head_lr: float | None, tunes_pretrained: bool) -> tuple[float, str]:
    """The new head's rate: `head_lr` when the config gives one, else the rule above; and the rule."""
    if head_lr is not None:
        return head_lr, "head_lr as configured"
    if tunes_pretrained:
        return max(lr, HEAD_LR), f"head at max(lr, {HEAD_LR:g}), the rate a new head trains at alone"
    return lr, "head at lr (every weight that trains is new)"


def resolve_rates(
    lr: float | str | None,
    head_lr: float | None,
    method_lr: float,
    tunes_pretrained: bool,
    family_scale: float,
    found: float | None = None,
    multiplier: float = 1.0,
) -> Rates:
    """The rates of a run from its config values; for `lr: auto`, `found` is the range test's choice
    (None where the test found none: then the default rule applies). `multiplier` scales both."""
    if lr == "auto" and found is not None:
        rate, why = found, "lr: auto (the range test's choice)"
    elif lr == "auto":
        rate, why = default_lr(method_lr, tunes_pretrained, family_scale)
        why = f"lr: auto, but the range test's loss never clearly fell, so {why}"
    elif isinstance(lr, float):
        rate, why = lr, "lr as configured"
    else:
        rate, why = default_lr(method_lr, tunes_pretrained, family_scale)
    head, head_why = head_lr_for(rate, head_lr, tunes_pretrained)
    if multiplier == 1.0:
        return Rates(rate, head, f"{why}; {head_why}")
    return Rates(rate * multiplier, head * multiplier, f"{why}; {head_why}; both x lr_multiplier {multiplier:g}")
