"""Classifiers fine-tuned with tunesmith, as transformers models (shipped as `modeling_tunesmith.py`).

tunesmith's classifiers put a new linear head on a pre-trained backbone's pooled states: the mean
over a text's real tokens (or its first or last token), an image backbone's pooled features, the
mean over a clip's encoder positions. No stock `*ForSequenceClassification` pools that way (BERT's
reads a dense+tanh "pooler" of the first token; Llama's drops the head's bias), so an export
carries this file and loads with `trust_remote_code=True`:

    AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)  # text
    AutoModelForImageClassification.from_pretrained(dir, trust_remote_code=True)     # images
    AutoModelForAudioClassification.from_pretrained(dir, trust_remote_code=True)     # audio

It needs only torch and transformers (it is copied into every export and must not import tunesmith);
the pooling below is the same arithmetic as tunesmith.models.classifier, .image and .audio, which
the export's parity check confirms on held-out rows before anything is written.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = ["TunesmithClassifier", "TunesmithClassifierConfig"]


class TunesmithClassifierConfig(PretrainedConfig):
    """A backbone's own config (`backbone_spec`, a dict with its `model_type`), how its states are pooled,
    and the head's size (`num_labels`, `id2label` as usual)."""

    model_type = "tunesmith-classifier"

    def __init__(
        self,
        backbone_spec: dict[str, Any] | None = None,
        input_kind: str = "text",  # text | image | audio
        pooling: str = "mean",  # text: mean | cls | last
        feature_dim: int = 0,
        encoder_only: bool = False,  # audio: the backbone is the encoder of an encoder-decoder (Whisper)
        pooler: bool = False,  # whether the backbone keeps its own pooling layer (ResNet's, not BERT's)
        **kwargs: Any,
    ) -> None:
        self.backbone_spec = backbone_spec or {}
        self.input_kind = input_kind
        self.pooling = pooling
        self.feature_dim = feature_dim
        self.encoder_only = encoder_only
        self.pooler = pooler
        super().__init__(**kwargs)


class TunesmithClassifier(PreTrainedModel):
    config_class = TunesmithClassifierConfig
    base_model_prefix = "backbone"
    main_input_name = "input_ids"

    def __init__(self, config: TunesmithClassifierConfig) -> None:
        super().__init__(config)
        spec = dict(config.backbone_spec)
        backbone: Any
        if spec.get("model_type") == "tunesmith-network":
            backbone = _tunesmith_network(spec)
        elif config.encoder_only:
            from transformers.models.whisper.modeling_whisper import WhisperEncoder

            backbone = WhisperEncoder(AutoConfig.for_model(spec.pop("model_type"), **spec))  # type: ignore[arg-type]
        else:
            backbone = AutoModel.from_config(AutoConfig.for_model(spec.pop("model_type"), **spec))
        if getattr(backbone, "pooler", None) is not None and not config.pooler:
            backbone.pooler = None  # tunesmith's model had none: its head pools the states itself
        self.backbone: Any = backbone
        self.dropout = nn.Dropout(0.0)
        self.head = nn.Linear(config.feature_dim, int(config.num_labels or 1))
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        frames: torch.Tensor | None = None,
        input_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput:
        kind = self.config.input_kind
        if kind == "text":
            assert input_ids is not None and attention_mask is not None
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            features = _pool_tokens(hidden, attention_mask, self.config.pooling)
        elif kind == "image" and hasattr(self.backbone, "features"):  # tunesmith's own conv net
            features = self.backbone.features(pixel_values)
        elif kind == "image":
            assert pixel_values is not None
            features = _pool_image(self.backbone(pixel_values=pixel_values))
        elif input_features is not None:  # Whisper: the mean over the positions that hold the clip
            hidden = self.backbone(input_features=input_features).last_hidden_state
            mask = None
            if frames is not None:
                mask = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < frames.long()[:, None]
            features = _mean(hidden, mask)
        else:  # a waveform encoder (wav2vec2, HuBERT, WavLM)
            hidden = self.backbone(input_values=input_values, attention_mask=attention_mask).last_hidden_state
            mask = None
            if attention_mask is not None and hasattr(self.backbone, "_get_feature_vector_attention_mask"):
                mask = self.backbone._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
            features = _mean(hidden, mask)
        logits = self.head(self.dropout(features.to(self.head.weight.dtype)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits, labels) if logits.shape[-1] > 1 else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _tunesmith_network(spec: dict[str, Any]) -> nn.Module:
    """A network of tunesmith's own; exports that hold one ship its file and redefine this below."""
    raise ValueError(f"this export does not ship the network {spec.get('name')!r}")


def _pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    if how == "cls":
        return hidden[:, 0]
    if how == "last":
        last = mask.sum(1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return _mean(hidden, mask)


def _pool_image(out: Any) -> torch.Tensor:
    pooled = getattr(out, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)  # type: ignore[no-any-return]
    hidden = out.last_hidden_state
    return hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(2, 3))  # type: ignore[no-any-return]


def _mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return hidden.mean(dim=1)
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
