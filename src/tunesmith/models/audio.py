"""An audio classifier: a pre-trained speech encoder, its states mean-pooled over the clip's frames,
and a new linear head.

The encoder is Whisper's (the packaged `whisper-tiny-en`, or any transformers Whisper directory or
hub id) or a waveform encoder loaded through `AutoModel` (wav2vec2, HuBERT, WavLM). As for text and
images, the head sits outside the encoder so a frozen encoder's pooled features can be cached and
peft can wrap the encoder alone.

Whisper's encoder was trained on 30 s windows and insists on exactly that many input frames; a
keyword lasts a second. `AudioInputs` pads every clip to `data.max_seconds` instead and the encoder's
position table is cut to match (`tunesmith.models.speech.shorten_encoder`), so a 1.5 s clip costs 1.5 s of encoder
compute rather than 30 (the sinusoidal positions of the first seconds are the same ones the model
learned). Pooling averages only the positions that hold the clip, not the padding after it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tunesmith.config import ModelConfig
from tunesmith.errors import ConfigError
from tunesmith.models.load import load_error, resolve_source
from tunesmith.models.speech import POSITIONS_PER_SECOND, shorten_encoder

__all__ = [
    "AudioClassifier",
    "AudioInputs",
    "SpeechToText",
    "audio_inputs",
    "build_audio_classifier",
    "build_speech_to_text",
    "load_speech_encoder",
]

WHISPER_SAMPLES_PER_POSITION = 320  # at 16 kHz: hop 160 x stride 2
SAVED_INPUTS = "tunesmith_audio.json"  # the clip length, saved beside the feature extractor


@dataclass
class AudioInputs:
    """How clips become a model's inputs: Whisper's log-mel features, or a normalised waveform.

    Attributes:
        kind: "log-mel" (Whisper: `input_features` (B, mels, 2P) and `frames` (B,), the positions
            that hold the clip) or "waveform" (`input_values` (B, S) and `attention_mask` (B, S)).
        rate: the model's sampling rate; clips are resampled to it.
        max_samples: every clip is padded (or cut) to this many samples.
        extractor: the model's transformers feature extractor.
    """

    kind: str
    rate: int
    max_samples: int
    extractor: Any = field(repr=False)

    @property
    def max_seconds(self) -> float:
        return self.max_samples / self.rate

    def describe(self) -> str:
        """What fixes the inputs (for cache keys): a change here must never reuse stale features."""
        mels = getattr(self.extractor, "feature_size", "")
        return f"{self.kind}:{self.rate}:{self.max_samples}:{type(self.extractor).__name__}:{mels}"

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the feature extractor and the clip length with a run, so it loads the same inputs."""
        from tunesmith.runs import atomic_write_text

        self.extractor.save_pretrained(directory)
        atomic_write_text(Path(directory) / SAVED_INPUTS, json.dumps({"max_seconds": self.max_seconds}) + "\n")

    def batch(self, waves: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Model inputs for a batch of mono float32 clips at `rate`."""
        waves = [w[: self.max_samples] for w in waves]
        if self.kind == "log-mel":
            out = self.extractor(
                waves,
                sampling_rate=self.rate,
                max_length=self.max_samples,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            )
            frames = torch.tensor([max(1, math.ceil(len(w) / WHISPER_SAMPLES_PER_POSITION)) for w in waves])
            return {"input_features": out["input_features"], "frames": frames}
        out = self.extractor(
            waves,
            sampling_rate=self.rate,
            max_length=self.max_samples,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return {"input_values": out["input_values"], "attention_mask": out["attention_mask"]}


class AudioClassifier(nn.Module):
    """Speech encoder + masked mean pooling + a new head."""

    pretrained_lr_scale = 1.0  # a transformer: the methods' default rates are for it (plugins.TaskModel)

    def __init__(self, backbone: nn.Module, feature_dim: int, num_labels: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_labels)

    # --- the encoder, whole or split at a block ---------------------------------------------------
    def encode(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) of a batch of model inputs (see `AudioInputs.batch`)."""
        if "input_features" in inputs:
            hidden = self.backbone(input_features=inputs["input_features"]).last_hidden_state
            return _pool(hidden, _position_mask(inputs["frames"], hidden.shape[1]))
        mask = inputs.get("attention_mask")
        hidden = self.backbone(input_values=inputs["input_values"], attention_mask=mask).last_hidden_state
        encoder: Any = _unwrapped(self.backbone)
        frame_mask = None
        if mask is not None and hasattr(encoder, "_get_feature_vector_attention_mask"):
            frame_mask = encoder._get_feature_vector_attention_mask(hidden.shape[1], mask)
        return _pool(hidden, frame_mask)

    def can_split(self, k: int) -> bool:
        """Whether the encoder can run from block `k` on cached states (Whisper's encoder)."""
        encoder: Any = self.backbone
        return _is_whisper_encoder(encoder) and 0 < k <= len(encoder.layers)

    def encode_prefix(self, k: int, **inputs: torch.Tensor) -> torch.Tensor:
        """The states (B, P, D) entering block `k`: the conv stem, the positions and blocks 0..k-1."""
        enc: Any = self.backbone
        x = nn.functional.gelu(enc.conv1(inputs["input_features"]))
        x = nn.functional.gelu(enc.conv2(x)).permute(0, 2, 1)
        x = x + enc.embed_positions.weight[: x.shape[1]]
        x = nn.functional.dropout(x, p=enc.dropout, training=enc.training)
        for layer in enc.layers[:k]:
            x = layer(x, None)
        return x  # type: ignore[no-any-return]

    def encode_suffix(self, hidden: torch.Tensor, k: int, frames: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) from the states entering block `k`."""
        enc: Any = self.backbone
        x = hidden
        for layer in enc.layers[k:]:
            x = layer(x, None)
        x = enc.layer_norm(x)
        return _pool(x, _position_mask(frames, x.shape[1]))

    def forward(
        self,
        input_features: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        start_block: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Logits (B, num_labels) from model inputs, from cached pooled `features` (B, D), or from
        cached states `hidden` (B, P, D) entering block `start_block`."""
        if features is None and hidden is not None:
            assert frames is not None
            features = self.encode_suffix(hidden, int(start_block), frames)
        elif features is None:
            inputs = {"input_features": input_features, "frames": frames}
            if input_features is None:
                inputs = {"input_values": input_values, "attention_mask": attention_mask}
            features = self.encode(**{k: v for k, v in inputs.items() if v is not None})
        return self.head(self.dropout(features.to(self.head.weight.dtype)))  # type: ignore[no-any-return]


def build_audio_classifier(cfg: ModelConfig, num_labels: int, seed: int, inputs: AudioInputs) -> AudioClassifier:
    """The pre-trained speech encoder, cut to the clips `inputs` makes, with a new head of
    `num_labels` outputs seeded from `seed` (fp32, train mode)."""
    encoder = load_speech_encoder(cfg, inputs.max_seconds)
    dim = int(getattr(encoder.config, "d_model", 0) or getattr(encoder.config, "hidden_size", 0))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AudioClassifier(encoder, dim, num_labels, cfg.head_dropout)
    model.train()
    return model


def load_speech_encoder(cfg: ModelConfig, max_seconds: float) -> nn.Module:
    """The encoder of a speech model: Whisper's encoder alone (cut to `max_seconds`), a waveform
    encoder (wav2vec2, HuBERT, WavLM) whole; fp32, train mode."""
    from transformers import AutoModel

    path = resolve_source(cfg, "speech")
    try:
        model = AutoModel.from_pretrained(path, revision=cfg.revision, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(load_error(cfg.name, exc, "a speech model", "speech")) from None
    if model.config.model_type == "whisper":
        shorten_encoder(model, whisper_positions(max_seconds, model.config.max_source_positions) / POSITIONS_PER_SECOND)
        encoder = model.get_encoder()
    elif hasattr(model, "feature_extractor") or hasattr(model, "feature_projection"):
        encoder = model
    else:
        raise ConfigError(
            f"model.name={cfg.name}: a {model.config.model_type} model is not a speech encoder tunesmith knows; "
            "use Whisper, wav2vec2, HuBERT or WavLM"
        )
    encoder.train()
    return encoder  # type: ignore[no-any-return]


def audio_inputs(cfg: ModelConfig, max_seconds: float, saved: Path | None = None) -> AudioInputs:
    """The model's feature extractor (or the one saved with a run), with clips padded to `max_seconds`
    (Whisper: a whole number of encoder positions)."""
    from transformers import AutoConfig, AutoFeatureExtractor

    path = str(saved) if saved is not None else resolve_source(cfg, "speech")
    revision = None if saved is not None else cfg.revision
    try:
        extractor = AutoFeatureExtractor.from_pretrained(path, revision=revision)
        config = AutoConfig.from_pretrained(resolve_source(cfg, "speech"), revision=cfg.revision)
    except (OSError, ValueError) as exc:
        raise ConfigError(load_error(cfg.name, exc, "a speech model's feature extractor", "speech")) from None
    rate = int(getattr(extractor, "sampling_rate", 16000))
    if config.model_type == "whisper":
        positions = whisper_positions(max_seconds, int(config.max_source_positions))
        return AudioInputs("log-mel", rate, positions * WHISPER_SAMPLES_PER_POSITION * rate // 16000, extractor)
    return AudioInputs("waveform", rate, math.ceil(max_seconds * rate), extractor)


def whisper_positions(max_seconds: float, limit: int) -> int:
    """Encoder positions for clips of `max_seconds` (at most the model's own `limit`, 1500 for 30 s)."""
    return min(limit, max(1, math.ceil(max_seconds * POSITIONS_PER_SECOND)))


def _position_mask(frames: torch.Tensor, width: int) -> torch.Tensor:
    return torch.arange(width, device=frames.device)[None, :] < frames.to(torch.long)[:, None]


def _pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of each row's states over its frames (all of them where `mask` is None)."""
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def _unwrapped(backbone: nn.Module) -> nn.Module:
    """The model inside a peft wrapper (the backbone itself where there is none)."""
    inner = getattr(getattr(backbone, "base_model", None), "model", None)
    return inner if isinstance(inner, nn.Module) else backbone


def _is_whisper_encoder(module: nn.Module) -> bool:
    return type(module).__name__ == "WhisperEncoder"


class SpeechToText(nn.Module):
    """A Whisper model for transcription, split as a causal LM is (models/causal_lm.py): `backbone` is
    the encoder-decoder that methods wrap or freeze, `lm_head` its output layer (tied to the decoder's
    token embeddings), `head` empty (transcription adds no new head). `forward` gives logits over the
    vocabulary; `transcribe` decodes greedily through transformers' own Whisper generation, which
    shares these very modules (a LoRA or adapter injected into the backbone is used as it trains)."""

    pretrained_lr_scale = 1.0  # a transformer: the methods' default rates are for it (plugins.TaskModel)

    def __init__(self, whisper: nn.Module) -> None:
        super().__init__()
        model: Any = whisper
        self.backbone = model.model
        self.lm_head = model.proj_out
        self.head = nn.ModuleDict()
        self.lm_head.weight.requires_grad_(False)  # the tied embedding: `full` unfreezes it with the rest
        object.__setattr__(self, "_whisper", whisper)  # not a submodule: its parameters are ours already

    def forward(
        self, input_features: torch.Tensor, decoder_input_ids: torch.Tensor, decoder_attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (B, T, V) of the next token at each decoder position, in fp32."""
        out = self.backbone(
            input_features=input_features,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            use_cache=False,
        )
        return self.lm_head(out.last_hidden_state.to(self.lm_head.weight.dtype)).float()  # type: ignore[no-any-return]

    @torch.no_grad()
    def transcribe(self, input_features: torch.Tensor, max_new_tokens: int, language: str | None) -> torch.Tensor:
        """Greedy token ids (B, T), the decoder prompt included."""
        whisper: Any = self._whisper
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "do_sample": False, "num_beams": 1}
        if getattr(whisper.generation_config, "is_multilingual", False):
            kwargs |= {"language": language or "en", "task": "transcribe"}
        was_training = self.training
        self.eval()
        try:
            return whisper.generate(input_features=input_features, **kwargs)  # type: ignore[no-any-return]
        finally:
            self.train(was_training)


def build_speech_to_text(cfg: ModelConfig, inputs: AudioInputs) -> SpeechToText:
    """The pre-trained Whisper model (fp32, train mode) with its encoder cut to the clips `inputs` makes."""
    from transformers import AutoModelForSpeechSeq2Seq

    path = resolve_source(cfg, "speech")
    try:
        whisper = AutoModelForSpeechSeq2Seq.from_pretrained(path, revision=cfg.revision, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(load_error(cfg.name, exc, "a speech-to-text model", "speech")) from None
    if whisper.config.model_type != "whisper":
        raise ConfigError(
            f"model.name={cfg.name}: transcription fine-tunes Whisper models; {whisper.config.model_type} is not one"
        )
    positions = whisper_positions(inputs.max_seconds, whisper.config.max_source_positions)
    shorten_encoder(whisper, positions / POSITIONS_PER_SECOND)
    model = SpeechToText(whisper)
    model.train()
    return model
