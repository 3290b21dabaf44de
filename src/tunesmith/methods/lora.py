"""LoRA: a trainable low-rank update B·A beside frozen linear weights (Hu et al. 2021), through
peft; DoRA (Liu et al. 2024) and rank-stabilised scaling (Kalajdzievski 2023) as options."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunesmith.config import MethodSection
from tunesmith.methods import BaseMethod, merge_peft
from tunesmith.methods.targets import lora_targets
from tunesmith.models.classifier import TextClassifier
from tunesmith.registry import register_method
from tunesmith.training.dropout import DroppedLinear
from tunesmith.training.fused_lora import fuse_lora_linears


class LoraConfig(MethodSection):
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


@register_method("lora")
class LoraMethod(BaseMethod):
    """Train low-rank updates beside the block linears (and a conv net's convs); the base stays frozen."""

    name = "lora"
    config = LoraConfig
    default_lr = 5e-4
    peft_adapter = True

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
        recompute_lora_dropout(model.backbone)
        fuse_lora_linears(model.backbone)
        for param in model.head.parameters():
            param.requires_grad_(True)

    def noop_reason(self, model: TextClassifier) -> str | None:
        b_weights = [p for n, p in model.named_parameters() if "lora_B" in n]
        if b_weights and all(torch.count_nonzero(p) == 0 for p in b_weights):
            return "every LoRA B matrix is zero, so the adapter adds nothing (it never trained)"
        return None

    def merge(self, model: TextClassifier) -> None:
        merge_peft(model)


def recompute_lora_dropout(backbone: torch.nn.Module) -> int:
    """Fold each plain LoRA linear's input dropout (none is dropout 0) into its A matrix
    (`DroppedLinear`), so the backward pass keeps the shared input once (or nothing, where the input
    is cheap to compute again: models/recompute.py) and the mask at one bit an element, instead of a dropped
    copy per adapter; the parameters and their names are unchanged. DoRA and LoRA on convolutions keep
    peft's own path. Returns how many adapters were folded."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    folded = 0
    for module in backbone.modules():
        if not isinstance(module, LoraLinear):
            continue
        for adapter, dropout in list(module.lora_dropout.items()):
            a = module.lora_A[adapter]
            if (
                type(dropout) in (torch.nn.Dropout, torch.nn.Identity)
                and adapter not in module.lora_variant
                and type(a) is torch.nn.Linear
                and a.bias is None
            ):
                a.__class__ = DroppedLinear
                a.p = dropout.p if isinstance(dropout, torch.nn.Dropout) else 0.0
                module.lora_dropout[adapter] = torch.nn.Identity()
                folded += 1
    return folded
