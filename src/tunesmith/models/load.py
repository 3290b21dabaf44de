"""Load a pre-trained backbone and tokenizer: packaged short name, local directory or hub id."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from tunesmith.config import ModelConfig
from tunesmith.errors import ConfigError
from tunesmith.models.causal_lm import CausalLM
from tunesmith.models.classifier import TextClassifier
from tunesmith.models.gated_mlp import recompute_gated_activations
from tunesmith.models.recompute import recompute_norm_outputs
from tunesmith.zoo import PACKAGED_MODELS, model_source_path

__all__ = [
    "attention_kernel",
    "build_causal_lm",
    "build_classifier",
    "load_backbone",
    "load_error",
    "load_tokenizer",
    "resolve_model_path",
    "resolve_source",
]


def load_backbone(cfg: ModelConfig) -> nn.Module:
    """The pre-trained encoder (`AutoModel`), in fp32 and train mode."""
    from transformers import AutoModel

    path = _resolve(cfg)
    try:
        model = AutoModel.from_pretrained(path, revision=cfg.revision, dtype=torch.float32)
    except OSError as exc:
        raise ConfigError(_load_error(cfg.name, exc)) from None
    model.train()
    return model


def load_tokenizer(cfg: ModelConfig, kind: str = "text"):  # -> PreTrainedTokenizerBase
    """The model's tokenizer, for a task that needs a `kind` model ("text", or "speech" for Whisper's)."""
    from transformers import AutoTokenizer

    path = resolve_source(cfg, kind)
    try:
        return AutoTokenizer.from_pretrained(path, revision=cfg.revision)
    except OSError as exc:
        raise ConfigError(_load_error(cfg.name, exc)) from None


def build_classifier(cfg: ModelConfig, num_labels: int, seed: int) -> TextClassifier:
    """Backbone + pooling + a new head of `num_labels` outputs, initialised from `seed`."""
    backbone = load_backbone(cfg)
    hidden = int(getattr(backbone.config, "hidden_size", 0) or getattr(backbone.config, "dim", 0))
    if not hidden:
        raise ConfigError(f"model.name={cfg.name}: cannot tell the hidden size from its config")
    if getattr(backbone, "pooler", None) is not None:
        # The head pools token states itself; an unused pooler would never train.
        backbone.pooler = None  # type: ignore[assignment]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return TextClassifier(backbone, hidden, num_labels, cfg.pooling, cfg.head_dropout)


def build_causal_lm(cfg: ModelConfig, max_length: int) -> CausalLM:
    """A pre-trained causal LM (fp32, train mode) split into decoder and output layer.

    The output layer starts frozen (with tied embeddings it *is* the input embedding); `full`
    unfreezes it with everything else.
    """
    from transformers import AutoModelForCausalLM

    path = _resolve(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.revision, dtype=torch.float32, attn_implementation=attention_kernel(cfg, max_length)
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(_load_error(cfg.name, exc, "a causal language model")) from None
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or decoder is None:
        raise ConfigError(f"model.name={cfg.name}: {type(model).__name__} has no decoder and linear output layer")
    head.weight.requires_grad_(False)
    recompute_gated_activations(decoder)  # a third less of the MLPs' saved activations
    recompute_norm_outputs(decoder)  # what adapters read from norms is computed again, not kept
    eos = getattr(model.generation_config, "eos_token_id", None)
    lm = CausalLM(decoder, head, tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]))
    lm.attention_request = cfg.attention  # auto: training measures which kernel to use
    lm.train()
    return lm


def attention_kernel(cfg: ModelConfig, max_length: int) -> str:
    """`model.attention` as the model loads: auto loads with torch's fused kernel ("sdpa"), and
    training replaces it with whichever kernel a probe measured faster on this machine at the run's
    shapes (training/kernels.py)."""
    return "sdpa" if cfg.attention == "auto" else cfg.attention


def _resolve(cfg: ModelConfig) -> str:
    return resolve_source(cfg, "text")


def resolve_source(cfg: ModelConfig, kind: str) -> str:
    """Where to load `model.name` from, for a task that needs a `kind` ("text" or "image") model.

    Raises:
        ConfigError: a packaged model of another kind, or a local path that is not a directory.
    """
    packaged = PACKAGED_MODELS.get(cfg.name)
    if packaged is not None and packaged.kind != kind:
        raise ConfigError(
            f"model.name={cfg.name}: {'an' if packaged.kind[0] in 'aeiou' else 'a'} {packaged.kind} model, "
            f"which {kind} tasks cannot use; "
            f"{kind} models: {', '.join(n for n, p in PACKAGED_MODELS.items() if p.kind == kind)}"
        )
    path = resolve_model_path(cfg.name)
    looks_local = path.startswith((".", "/", "~")) or (os.sep in path and Path(path).exists())
    if looks_local and not Path(path).expanduser().is_dir():
        raise ConfigError(f"model.name={cfg.name}: no such directory")
    return str(Path(path).expanduser()) if looks_local else path


def resolve_model_path(name: str) -> str:
    """The directory to load `name` from.

    A packaged short name becomes its directory; a packaged GGUF or any path ending in `.gguf`
    becomes its fp32 conversion, made once and cached (see `tunesmith.models.gguf`); so does a
    directory holding a CTranslate2 Whisper model (see `tunesmith.models.whisper_ct2`); anything else
    (a local directory, a hub id) is returned unchanged. Run hashes still use `model_source_path`.

    Raises:
        ConfigError: a packaged carrier is not installed, or a `.gguf` file or CTranslate2 model
            cannot be converted.
    """
    source = model_source_path(name)
    if source.lower().endswith(".gguf"):
        from tunesmith.models.gguf import convert_gguf  # lazy: it pulls in transformers when converting

        return str(convert_gguf(source))
    from tunesmith.models.whisper_ct2 import convert_ct2_whisper, is_ct2_whisper_dir  # lazy, as above

    if is_ct2_whisper_dir(Path(source).expanduser()):
        return str(convert_ct2_whisper(source))
    return source


def _load_error(name: str, exc: Exception, kind: str = "a model") -> str:
    return load_error(name, exc, kind)


def load_error(name: str, exc: Exception, kind: str = "a model", packaged_kind: str = "text") -> str:
    known = ", ".join(n for n, p in PACKAGED_MODELS.items() if p.kind == packaged_kind)
    return (
        f"model.name={name}: could not load it as {kind} ({str(exc).splitlines()[0]}). Give a packaged short name "
        f"({known}), a local Hugging Face directory, or a hub id (which needs a network)."
    )
