"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP"):
down-project, nonlinearity, up-project, added to a sub-layer's output before its residual.
Written by hand (peft has no such method); the up-projection starts at zero, so at init the model
computes exactly what the base computes."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from tunesmith.config import MethodSection
from tunesmith.methods import BaseMethod, freeze_backbone
from tunesmith.methods.targets import OUTPUT_PROJECTIONS, match_targets
from tunesmith.models.anatomy import linear_width
from tunesmith.models.classifier import TextClassifier
from tunesmith.registry import register_method


class AdapterConfig(MethodSection):
    """Bottleneck adapters after attention and feed-forward outputs (Houlsby et al. 2019)."""

    name: Literal["adapter"] = "adapter"
    bottleneck: int = Field(64, gt=0, description="Width of the down-projection.")
    activation: Literal["relu", "gelu", "tanh"] = Field("relu", description="Nonlinearity in the bottleneck.")
    target_modules: list[str] | None = Field(
        None, description="Output projections to wrap (default: attention and FFN outputs)."
    )


_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class Bottleneck(nn.Module):
    """y -> y + up(act(down(y))), wrapped around an existing output projection."""

    def __init__(self, inner: nn.Module, bottleneck: int, activation: str) -> None:
        super().__init__()
        self.inner = inner
        width = linear_width(inner)
        self.adapter_down = nn.Linear(width, bottleneck)
        self.adapter_act = _ACTIVATIONS[activation]()
        self.adapter_up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return y + self.adapter_up(self.adapter_act(self.adapter_down(y)))


@register_method("adapter")
class AdapterMethod(BaseMethod):
    """Insert small bottleneck layers after attention and FFN outputs; train only those."""

    name = "adapter"
    config = AdapterConfig
    default_lr = 1e-3
    standard_layers = False  # its bottlenecks are layers no transformers or peft model has

    def __init__(self, cfg: AdapterConfig) -> None:
        super().__init__(cfg)
        self.cfg: AdapterConfig = cfg

    def apply(self, model: TextClassifier) -> None:
        freeze_backbone(model)
        targets = match_targets(model.backbone, self.cfg.target_modules, OUTPUT_PROJECTIONS, "method.target_modules")
        for name in targets:
            parent_name, _, child = name.rpartition(".")
            parent = model.backbone.get_submodule(parent_name)
            inner = getattr(parent, child)
            wrapped = Bottleneck(inner, self.cfg.bottleneck, self.cfg.activation)
            wrapped.to(device=inner.weight.device, dtype=inner.weight.dtype)
            setattr(parent, child, wrapped)
        for name, param in model.backbone.named_parameters():
            param.requires_grad_(".adapter_" in name)

    def noop_reason(self, model: TextClassifier) -> str | None:
        ups = [p for n, p in model.named_parameters() if ".adapter_up." in n]
        if ups and all(torch.count_nonzero(p) == 0 for p in ups):
            return "every adapter up-projection is zero, so the adapters add nothing (they never trained)"
        return None
