"""Freezing strategies: feature extraction (only the new head trains, on features computed once)
and partial fine-tuning (the top blocks train; Yosinski et al. 2014 on how transferable each layer
is; gradual unfreezing from ULMFiT, Howard & Ruder 2018)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from tunesmith.config import MethodSection
from tunesmith.errors import ConfigError
from tunesmith.methods import BaseMethod, freeze_backbone, param_groups
from tunesmith.methods.full import layer_decay_scale
from tunesmith.models.anatomy import block_index, find_blocks, is_input_stage, is_output_stage
from tunesmith.models.classifier import TextClassifier
from tunesmith.registry import register_method
from tunesmith.training.rates import HEAD_LR


class FeatureExtractionConfig(MethodSection):
    """Train only the new head on frozen (cached) backbone features."""

    name: Literal["feature-extraction"] = "feature-extraction"


class PartialConfig(MethodSection):
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


@register_method("feature-extraction")
class FeatureExtractionMethod(BaseMethod):
    """Freeze the backbone; train only the new head on cached features (fastest, fewest weights)."""

    name = "feature-extraction"
    config = FeatureExtractionConfig
    default_lr = HEAD_LR  # the rate a new head trains at alone (also its floor under full and partial)
    frozen_backbone = True

    def __init__(self, cfg: FeatureExtractionConfig) -> None:
        super().__init__(cfg)

    def apply(self, model: TextClassifier) -> None:
        freeze_backbone(model)


@register_method("partial")
class PartialMethod(BaseMethod):
    """Freeze the embeddings (or a conv net's stem) and the bottom blocks or stages (or all but a regex);
    train the rest and the head."""

    name = "partial"
    config = PartialConfig
    default_lr = 5e-5
    tunes_pretrained = True

    def __init__(self, cfg: PartialConfig) -> None:
        super().__init__(cfg)
        self.cfg: PartialConfig = cfg

    def apply(self, model: TextClassifier) -> None:
        freeze_backbone(model)
        self.frozen_blocks = 0
        if self.cfg.trainable_regex is not None:
            self._unfreeze_regex(model, self.cfg.trainable_regex)
            return
        blocks_name, blocks = find_blocks(model.backbone)
        frozen = self._frozen_count(len(blocks))
        for name, param in model.backbone.named_parameters():
            index = block_index(name, blocks_name)
            param.requires_grad_(
                (index is not None and index >= frozen) or (index is None and not is_input_stage(name))
            )
        _no_dropout_below(model, blocks_name, frozen)
        # The loop may run the frozen prefix once and cache its output, but only when every trainable
        # backbone weight sits in blocks >= frozen or is the final norm after them: any other trainable
        # weight outside the block stack could run before block `frozen` in some architecture, and
        # caching would stop it training.
        outside = [
            n
            for n, p in model.backbone.named_parameters()
            if p.requires_grad and block_index(n, blocks_name) is None and not is_output_stage(n)
        ]
        self.frozen_blocks = frozen if not outside else 0

    def _frozen_count(self, depth: int) -> int:
        frozen = self.cfg.freeze_layers if self.cfg.freeze_layers is not None else max(depth - 2, 0)
        if frozen > depth:
            raise ConfigError(f"method.freeze_layers={frozen}: the model has only {depth} blocks")
        return frozen

    def on_epoch_start(self, model: TextClassifier, epoch: int) -> None:
        """Gradual unfreezing: the top block first, one more every `unfreeze_every` epochs."""
        if self.cfg.unfreeze_every is None or self.cfg.trainable_regex is not None:
            return
        blocks_name, blocks = find_blocks(model.backbone)
        depth, frozen = len(blocks), self._frozen_count(len(blocks))
        lowest_open = max(depth - 1 - epoch // self.cfg.unfreeze_every, frozen)
        for name, param in model.backbone.named_parameters():
            index = block_index(name, blocks_name)
            if index is not None and index >= frozen:
                param.requires_grad_(index >= lowest_open)

    def param_groups(self, model: TextClassifier, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        decay = self.cfg.layer_lr_decay
        scale = layer_decay_scale(model, decay) if decay < 1 and self.cfg.trainable_regex is None else None
        return param_groups(model, lr, head_lr, weight_decay, scale)

    @staticmethod
    def _unfreeze_regex(model: TextClassifier, pattern: str) -> None:
        try:
            regex = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"method.trainable_regex={pattern!r}: not a valid regex ({exc})") from None
        matched = [name for name, _ in model.backbone.named_parameters() if regex.search(name)]
        if not matched:
            sample = ", ".join(name for name, _ in list(model.backbone.named_parameters())[:4])
            raise ConfigError(f"method.trainable_regex={pattern!r} matches no parameter (names look like {sample})")
        for name, param in model.backbone.named_parameters():
            param.requires_grad_(name in matched)


def _no_dropout_below(model: TextClassifier, blocks_name: str, frozen: int) -> None:
    """Run the embeddings and blocks 0..frozen-1 without dropout, in training too.

    Those weights never train, so their output is a fixed function of the input, as in feature
    extraction; that is what lets the loop compute it once and cache it, and setting `p = 0` makes an
    uncached run compute exactly the same thing. `p = 0` rather than eval mode, because the loop's
    `model.train()` would switch eval mode back off; BERT-family attention reads its dropout
    module's `p` at call time, so this covers attention dropout too. Dropout with `p = 0` returns its
    input unchanged and draws no random numbers, so the blocks above see the same dropout masks either way.
    """
    for name, module in model.backbone.named_modules():
        index = block_index(name + ".", blocks_name)
        if isinstance(module, nn.Dropout) and (
            (index is not None and index < frozen) or (index is None and is_input_stage(name))
        ):
            module.p = 0.0
