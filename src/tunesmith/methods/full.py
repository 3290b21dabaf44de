"""Full fine-tuning: every weight trains, optionally with layer-wise LR decay (Howard & Ruder 2018;
Clark et al. 2020): lower blocks, which hold more general features, move more slowly."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunesmith.config import MethodSection
from tunesmith.methods import BaseMethod, param_groups
from tunesmith.models.anatomy import block_index, find_blocks, is_input_stage
from tunesmith.models.classifier import TextClassifier
from tunesmith.registry import register_method


class FullConfig(MethodSection):
    """Train every weight."""

    name: Literal["full"] = "full"
    layer_lr_decay: float = Field(
        1.0, gt=0.0, le=1.0, description="Multiply the LR by this for each block below the top (1 = off)."
    )


def layer_decay_scale(model: TextClassifier, decay: float):
    """name -> LR multiplier: decay**(blocks above it); embeddings sit below block 0."""
    blocks_name, blocks = find_blocks(model.backbone)
    depth = len(blocks)

    def scale(name: str) -> float:
        index = block_index(name, blocks_name)
        if index is not None:
            return float(decay ** (depth - 1 - index))
        return float(decay**depth) if is_input_stage(name) else 1.0

    return scale


@register_method("full")
class FullMethod(BaseMethod):
    """Train every weight of the backbone and the new head."""

    name = "full"
    config = FullConfig
    default_lr = 5e-5
    tunes_pretrained = True

    def __init__(self, cfg: FullConfig) -> None:
        super().__init__(cfg)

    def apply(self, model: TextClassifier) -> None:
        for param in model.parameters():
            param.requires_grad_(True)

    def param_groups(self, model: TextClassifier, lr: float, head_lr: float, weight_decay: float) -> list[dict]:
        scale = layer_decay_scale(model, self.cfg.layer_lr_decay) if self.cfg.layer_lr_decay < 1 else None
        return param_groups(model, lr, head_lr, weight_decay, scale)
