"""LoRA: a trainable low-rank update B·A beside frozen linear weights (Hu et al. 2021), through
peft; DoRA (Liu et al. 2024) and rank-stabilised scaling (Kalajdzievski 2023) as options."""

from __future__ import annotations

import torch

from tunesmith.config import LoraConfig
from tunesmith.methods import BaseMethod
from tunesmith.methods.targets import lora_targets
from tunesmith.models.classifier import TextClassifier
from tunesmith.registry import register_method


@register_method("lora")
class LoraMethod(BaseMethod):
    """Train low-rank updates beside the block linears (and a conv net's convs); the base stays frozen."""

    name = "lora"
    default_lr = 5e-4

    def __init__(self, cfg: LoraConfig) -> None:
        super().__init__(cfg)
        self.cfg: LoraConfig = cfg

    def apply(self, model: TextClassifier) -> None:
        import peft

        targets = lora_targets(model.backbone, self.cfg.target_modules, self.cfg.r, "method.target_modules")
        peft_cfg = peft.LoraConfig(
            r=self.cfg.r,
            lora_alpha=self.cfg.alpha,
            lora_dropout=self.cfg.dropout,
            target_modules=targets,
            use_dora=self.cfg.use_dora,
            use_rslora=self.cfg.use_rslora,
        )
        model.backbone = peft.get_peft_model(model.backbone, peft_cfg)
        for param in model.head.parameters():
            param.requires_grad_(True)

    def noop_reason(self, model: TextClassifier) -> str | None:
        b_weights = [p for n, p in model.named_parameters() if "lora_B" in n]
        if b_weights and all(torch.count_nonzero(p) == 0 for p in b_weights):
            return "every LoRA B matrix is zero, so the adapter adds nothing (it never trained)"
        return None
