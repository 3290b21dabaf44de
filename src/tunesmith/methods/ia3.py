"""IA3: learned vectors that rescale keys, values and feed-forward activations (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning"), via peft."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tunesmith.config import MethodSection
from tunesmith.methods import BaseMethod, merge_peft
from tunesmith.methods.targets import FFN_OUTPUT, KEYS_VALUES, match_targets
from tunesmith.models.classifier import TextClassifier
from tunesmith.registry import register_method


class IA3Config(MethodSection):
    """Learned scaling vectors on keys, values and FFN activations (Liu et al. 2022), through peft."""

    name: Literal["ia3"] = "ia3"
    target_modules: list[str] | None = Field(None, description="Modules to scale (default: keys, values, FFN out).")
    feedforward_modules: list[str] | None = Field(None, description="Which targets scale their input (FFN).")


@register_method("ia3")
class IA3Method(BaseMethod):
    """Train scaling vectors on keys, values and FFN inputs: the fewest weights of any adapter."""

    name = "ia3"
    config = IA3Config
    default_lr = 5e-3
    peft_adapter = True

    def __init__(self, cfg: IA3Config) -> None:
        super().__init__(cfg)
        self.cfg: IA3Config = cfg

    def apply(self, model: TextClassifier) -> None:
        import peft

        attn = match_targets(model.backbone, self.cfg.target_modules, KEYS_VALUES, "method.target_modules")
        ffn = match_targets(model.backbone, self.cfg.feedforward_modules, FFN_OUTPUT, "method.feedforward_modules")
        peft_cfg = peft.IA3Config(target_modules=sorted(set(attn) | set(ffn)), feedforward_modules=ffn)
        model.backbone = peft.get_peft_model(model.backbone, peft_cfg)
        for param in model.head.parameters():
            param.requires_grad_(True)

    def noop_reason(self, model: TextClassifier) -> str | None:
        vectors = [p for n, p in model.named_parameters() if "ia3_l" in n]
        if vectors and all(torch.all(p == 1) for p in vectors):
            return "every IA3 scaling vector is still 1, so the adapter changes nothing (it never trained)"
        return None

    def merge(self, model: TextClassifier) -> None:
        merge_peft(model)
