"""Whisper speech models on short clips: cut the encoder's fixed 30 s window to the clip's length.

Whisper's encoder refuses any input but exactly 2 x `max_source_positions` mel frames (3,000 frames,
30 s, for OpenAI's checkpoints), so a 2 s clip padded to 30 s costs fifteen times the encoder compute
it needs. Its position embeddings are a table, one row per encoder position (50 a second, after the
stride-2 convolution over 100 frames a second): keeping the first rows makes a shorter encoder
(DESIGN §12). The cut model no longer computes what the 30 s one did, since attention no longer sees
the padding, but it still transcribes (tested on the packaged Whisper tiny.en).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from tunesmith.errors import ConfigError

__all__ = ["FRAMES_PER_SECOND", "POSITIONS_PER_SECOND", "shorten_encoder"]

FRAMES_PER_SECOND = 100  # mel frames: a 10 ms hop at 16 kHz
POSITIONS_PER_SECOND = 50  # encoder positions: conv2 has stride 2


def shorten_encoder(model: Any, seconds: float) -> int:
    """Cut a transformers Whisper model's encoder to `seconds` of audio, in place.

    `config.max_source_positions` becomes ceil(seconds x 50) and the encoder's position table keeps
    that many rows (copied, so the original table is freed).

    Args:
        model: a `WhisperForConditionalGeneration` or `WhisperModel`.
        seconds: the longest clip the cut model will see; more than 0 and at most the current window.

    Returns:
        The number of mel frames the encoder now expects (2 x positions): cut features to it.

    Raises:
        ConfigError: `seconds` is not in (0, current window].
    """
    config = model.config
    window = config.max_source_positions / POSITIONS_PER_SECOND
    positions = math.ceil(seconds * POSITIONS_PER_SECOND)
    if not seconds > 0 or positions > config.max_source_positions:
        raise ConfigError(f"shorten_encoder: seconds={seconds} must be more than 0 and at most {window:g} s")
    encoder = model.get_encoder()
    old = encoder.embed_positions
    table = nn.Embedding(positions, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
    table.weight = nn.Parameter(old.weight[:positions].detach().clone(), requires_grad=old.weight.requires_grad)
    encoder.embed_positions = table
    encoder.max_source_positions = positions
    config.max_source_positions = positions
    encoder.config.max_source_positions = positions  # the same object in transformers today; kept in step anyway
    return positions * FRAMES_PER_SECOND // POSITIONS_PER_SECOND
