"""Which modules a method attaches to: defaults per architecture family, and checks that every
requested name exists (peft only complains when *no* target matches; DESIGN §13)."""

from __future__ import annotations

import re

from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.models.load import find_blocks, linear_names

__all__ = ["block_linears", "match_targets"]

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
            raise ConfigError(f"{key}: no default target fits {type(backbone).__name__}; list the modules to adapt")
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
