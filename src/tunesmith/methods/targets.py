"""Which modules a method attaches to: defaults per architecture family, and checks that every
requested name exists (peft only complains when *no* target matches; DESIGN §13)."""

from __future__ import annotations

import re

from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.models.anatomy import find_blocks, is_linear, linear_names

__all__ = ["block_linears", "lora_targets", "match_targets"]

# The second projection of each sub-layer: attention output and feed-forward output.
OUTPUT_PROJECTIONS = re.compile(
    r"(attention\.output\.dense|\.output\.dense|o_proj|down_proj|out_proj|fc2|dense_4h_to_h|\.c_proj)$"
)
# GPT-2's `c_attn` computes queries, keys and values in one layer (peft's IA3 default for it too).
KEYS_VALUES = re.compile(r"(\.key|\.value|k_proj|v_proj|k_lin|v_lin|c_attn)$")
FFN_OUTPUT = re.compile(r"(layer\.\d+\.output\.dense|down_proj|fc2|dense_4h_to_h|ffn\.lin2|mlp\.c_proj)$")


def block_linears(backbone: nn.Module) -> list[str]:
    """Full names of every linear layer inside the transformer blocks."""
    blocks_name, blocks = find_blocks(backbone)
    return linear_names(blocks, prefix=f"{blocks_name}.")


def match_targets(
    backbone: nn.Module, wanted: list[str] | None, default: re.Pattern[str] | None, key: str
) -> list[str]:
    """Full module names for `wanted` suffixes (or the `default` pattern over block linears).

    Raises:
        ConfigError: naming each requested target that matches no linear layer.
    """
    names = block_linears(backbone)
    if wanted is None:
        chosen = [n for n in names if default is None or default.search(n)]
        if not chosen:
            raise ConfigError(
                f"{key}: no linear layer in the blocks of {type(backbone).__name__} fits the default targets; "
                "list the modules to adapt (a conv net has none: use lora, partial, feature-extraction or full)"
            )
        return chosen
    all_linear = linear_names(backbone)
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in all_linear)]
    if missing:
        suffixes = sorted({n.split(".")[-1] for n in names})
        raise ConfigError(
            f"{key}: {', '.join(missing)} match no linear layer of {type(backbone).__name__} "
            f"(its block linears end in: {', '.join(suffixes)})"
        )
    return [n for n in all_linear if any(n == w or n.endswith("." + w) for w in wanted)]


def lora_targets(backbone: nn.Module, wanted: list[str] | None, r: int, key: str) -> list[str]:
    """Full names of the layers LoRA adapts: the linear layers and 2-D convolutions inside the
    blocks by default (a conv net's 1x1 and full convolutions; depthwise ones only where they fit),
    or those named in `wanted`.

    Raises:
        ConfigError: a requested name matches no linear or conv layer, or names one LoRA cannot
            adapt (a depthwise conv whose groups do not divide the rank, a conv that pads itself).
    """
    candidates = {n: m for n, m in backbone.named_modules() if n and (is_linear(m) or isinstance(m, nn.Conv2d))}
    if wanted is None:
        blocks_name, _ = find_blocks(backbone)
        chosen = [n for n, m in candidates.items() if n.startswith(blocks_name + ".") and _lora_misfit(m, r) is None]
        if not chosen:
            raise ConfigError(f"{key}: no linear or conv layer in the blocks of {type(backbone).__name__}; list them")
        return chosen
    chosen = [n for n in candidates if any(n == w or n.endswith("." + w) for w in wanted)]
    missing = [w for w in wanted if not any(n == w or n.endswith("." + w) for n in chosen)]
    if missing:
        suffixes = sorted({n.split(".")[-1] for n in candidates})
        raise ConfigError(
            f"{key}: {', '.join(missing)} match no linear or conv layer of {type(backbone).__name__} "
            f"(its layers end in: {', '.join(suffixes[:30])})"
        )
    for name in chosen:
        why = _lora_misfit(candidates[name], r)
        if why:
            raise ConfigError(f"{key}: {name} {why}")
    return chosen


def _lora_misfit(module: nn.Module, r: int) -> str | None:
    """Why LoRA cannot adapt `module` with rank `r` (None when it can)."""
    if not isinstance(module, nn.Conv2d):
        return None
    if module.groups > 1 and r % module.groups:
        return (
            f"is a depthwise/grouped conv ({module.groups} groups): peft needs a rank that is a multiple of "
            "the groups (and cannot merge it); leave it out of method.target_modules"
        )
    if type(module).__name__ == "SamePadConv2d" and (module.kernel_size != (1, 1) or module.stride != (1, 1)):
        return (
            "pads its input inside its own forward (TensorFlow 'same'), which a LoRA conv beside it would not "
            "see; adapt the 1x1 convs (expand_conv, project_conv, head_conv) instead"
        )
    return None
