"""Model anatomy: where a backbone keeps its blocks, which of its layers are linear, which
parameters belong to the input stage, and whether a peft adapter can be switched off to give the
base model back. Methods, the frozen-work cache and the reference models of DPO and RL read models
through these."""

from __future__ import annotations

import contextlib
import re
from contextlib import AbstractContextManager
from typing import Any

from torch import nn

from tunesmith.errors import ConfigError

__all__ = [
    "adapters_off",
    "block_index",
    "can_switch_off",
    "find_blocks",
    "is_input_stage",
    "is_linear",
    "is_output_stage",
    "linear_names",
    "linear_width",
]


def can_switch_off(model: nn.Module) -> bool:
    """Whether the model's backbone is a peft model whose adapter can be switched off (LoRA, IA3,
    prompt and prefix tuning): then the model, so switched, is its own base."""
    return callable(getattr(getattr(model, "backbone", None), "disable_adapter", None))


def adapters_off(model: nn.Module) -> AbstractContextManager[Any]:
    """peft's context that runs the base model alone, where the backbone has one (else a no-op: the
    model as it starts is the base, as for full, partial and bottleneck adapters)."""
    if not can_switch_off(model):
        return contextlib.nullcontext()
    return model.backbone.disable_adapter()  # type: ignore[operator,union-attr,no-any-return]


def find_blocks(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated blocks (name, module): a conv net's `stages` list where it has one (ResNet,
    ConvNeXt, EfficientNet-Lite0; not one stage's own layers), else the longest `ModuleList`
    (a transformer's blocks); of lists as long, the first whose blocks hold linear layers (a
    transformer's, not a speech encoder's convolutional front end)."""
    best: tuple[str, nn.ModuleList] | None = None
    best_rank = (0, False)
    lists = [(n, m) for n, m in backbone.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    stages = [(n, m) for n, m in lists if n.split(".")[-1] == "stages"]
    for name, module in stages[:1] or lists:
        rank = (len(module), any(is_linear(sub) for sub in module.modules()))
        if best is None or rank > best_rank:
            best, best_rank = (name, module), rank
    if best is None or len(best[1]) == 0:
        raise ConfigError(f"{type(backbone).__name__}: found no stack of transformer blocks")
    return best


def linear_names(root: nn.Module, prefix: str = "") -> list[str]:
    """Full names of every linear layer under `root`: `nn.Linear`, and the transposed `Conv1D`
    that GPT-2-family models use for theirs."""
    return [f"{prefix}{name}" for name, module in root.named_modules() if is_linear(module) and name]


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def linear_width(module: nn.Module) -> int:
    """Output features of a linear layer (`nn.Linear.out_features`, `Conv1D.nf`)."""
    width = getattr(module, "out_features", None) or getattr(module, "nf", None)
    if not isinstance(width, int):
        raise ConfigError(f"{type(module).__name__}: cannot tell its output width")
    return width


def is_input_stage(name: str) -> bool:
    """Whether a parameter outside the blocks belongs to the input stage: a transformer's
    embeddings, a conv net's stem (`embedder` in Hugging Face ResNets, `stem_*` in EfficientNet), a
    speech encoder's convolutional front end (Whisper's `conv1`/`conv2`, wav2vec2's
    `feature_extractor` and `feature_projection`)."""
    return "embed" in name or "stem" in name or _SPEECH_FRONT_END.match(name) is not None


def is_output_stage(name: str) -> bool:
    """Whether a parameter outside the blocks is the backbone's final norm, which runs after every
    block (Whisper's and Llama's top-level `layer_norm`/`norm`, GPT-2's `ln_f`)."""
    return _FINAL_NORM.match(name) is not None


_SPEECH_FRONT_END = re.compile(r"(conv\d+|feature_extractor|feature_projection)\.")
_FINAL_NORM = re.compile(r"(layer_norm|norm|final_layer_norm|ln_f)\.[^.]+$")


def block_index(param_name: str, blocks_name: str) -> int | None:
    """Which block a parameter name belongs to (None outside the blocks)."""
    match = re.search(re.escape(blocks_name) + r"\.(\d+)\.", param_name)
    return int(match.group(1)) if match else None
