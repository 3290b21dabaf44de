"""`--format hf`: a directory that plain transformers loads, with no tunesmith installed.

What the run's model becomes, by the kind of model (not the task: any task whose model is one of
these exports the same way):
- a causal LM (sft, dpo, rl): the model's own `*ForCausalLM` (`AutoModelForCausalLM`) with its
  tokenizer, chat template and generation config; tied input/output embeddings stay tied (one tensor
  saved, `tie_word_embeddings` true) and untied ones are saved apart;
- Whisper for transcription: `WhisperForConditionalGeneration` with its processor, the encoder cut to
  the run's clip length (`max_source_positions`, and the feature extractor padding to that length);
- a classifier (text, image, audio; reward models too): the backbone with tunesmith's pooling and
  head, as transformers custom code (`modeling_tunesmith.py`, loaded with `trust_remote_code=True`
  through `AutoModelFor{Sequence,Image,Audio}Classification`): no stock class pools as tunesmith does
  (tunesmith.exports.hf_remote_code says why). EfficientNet-Lite0, tunesmith's own network, travels
  as its torch-only file (tunesmith.models.efficientnet_net) beside the custom code.

LoRA and IA3 are merged into the base weights in fp32 (peft's merge) and saved in fp32. Prompt and
prefix tuning cannot be merged and the bottleneck adapter has no transformers layer: they refuse,
pointing to `--format peft` and `--format onnx`.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.exports import Exported
from tunesmith.exports.parity import Probe, compare, greedy, median_seconds
from tunesmith.inference import Trained
from tunesmith.models import efficientnet_net
from tunesmith.models.audio import AudioClassifier, SpeechToText
from tunesmith.models.causal_lm import CausalLM, base_decoder
from tunesmith.models.classifier import TextClassifier
from tunesmith.models.image import ImageClassifier

__all__ = ["check", "export"]

# fp32 weights saved as they are: only kernel choices (eager vs fused attention) separate the two.
TOLERANCE = 1e-3
REMOTE_CODE = "modeling_tunesmith.py"
_AUTO_CLASSES = {
    "text": "AutoModelForSequenceClassification",
    "image": "AutoModelForImageClassification",
    "audio": "AutoModelForAudioClassification",
}
_CLASSIFIERS: dict[type, str] = {TextClassifier: "text", ImageClassifier: "image", AudioClassifier: "audio"}


def check(trained: Trained, quantize: str | None) -> None:
    """Refuse, in one line, runs that plain transformers cannot load as one model."""
    method, model = trained.method, trained.model
    where = trained.where
    if method.virtual_tokens:
        raise ConfigError(
            f"{where}: {method.name} learns virtual tokens that no transformers model holds; export it with "
            "--format peft (plain peft loads it onto the base)"
        )
    if not method.standard_layers:
        raise ConfigError(
            f"{where}: {method.name} adds layers that no transformers model has; export it with --format onnx"
        )
    if not isinstance(model, CausalLM | SpeechToText | TextClassifier | ImageClassifier | AudioClassifier):
        raise ConfigError(f"{where}: no transformers form for a {type(model).__name__}")


def export(trained: Trained, probe: Probe, out: Path, quantize: str | None) -> Exported:
    model: Any = trained.model
    expected_transcripts = _transcripts(model, probe) if isinstance(model, SpeechToText) else None
    trained.method.merge(model)
    model.eval()
    if isinstance(model, CausalLM):
        _save_causal_lm(model, trained, out)
        return _check_causal_lm(probe, out)
    if isinstance(model, SpeechToText):
        _save_whisper(model, trained, out)
        hint = "\n" + _audio_hint(trained.objective.tokenizer.inputs)  # type: ignore[union-attr]
        return _check_whisper(probe, out, expected_transcripts or [], _transcript_tokens(model), hint)
    kind = next(k for cls, k in _CLASSIFIERS.items() if isinstance(model, cls))
    _save_classifier(model, kind, trained, out)
    hint = ""
    if kind == "audio" and "input_features" in probe.inputs:
        hint = "\n" + _audio_hint(trained.objective.inputs)  # type: ignore[attr-defined]
        hint += "\nframes = [ceil(len(clip) / 320) for clip in audio]  # positions that hold each clip (16 kHz)"
        hint += "\nlogits = model(input_features=features.input_features, frames=torch.tensor(frames)).logits"
    return _check_classifier(probe, out, kind, hint)


# --- causal LMs -------------------------------------------------------------------------------------
def _save_causal_lm(model: CausalLM, trained: Trained, out: Path) -> None:
    from transformers import AutoModelForCausalLM, GenerationConfig

    decoder: Any = base_decoder(model.backbone)
    config = decoder.config
    with torch.device("meta"):
        hf: Any = AutoModelForCausalLM.from_config(config)
    setattr(hf, hf.base_model_prefix, decoder)
    hf.set_output_embeddings(model.lm_head)
    tied = model.lm_head.weight is decoder.get_input_embeddings().weight
    hf.config.tie_word_embeddings = tied
    if hasattr(hf.config, "get_text_config"):
        hf.config.get_text_config().tie_word_embeddings = tied
    _no_meta(hf)
    try:
        hf.generation_config = GenerationConfig.from_pretrained(_base_dir(trained))
    except (OSError, ValueError):
        hf.generation_config = GenerationConfig.from_model_config(config)
    if model.eos_ids:
        hf.generation_config.eos_token_id = list(model.eos_ids)
    hf.save_pretrained(out)
    tokenizer: Any = trained.objective.tokenizer
    tokenizer.save_pretrained(out)


def _check_causal_lm(probe: Probe, out: Path) -> Exported:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    load = time.perf_counter() - started
    inputs = {k: probe.inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = hf(**inputs).logits
        generations = [greedy(hf, prompt, probe) for prompt in probe.prompts]
        latency = median_seconds(lambda: hf(**inputs), repeats=3) / probe.rows
    parity = compare(probe, logits, TOLERANCE, generations, note="fp32 weights, LoRA/IA3 merged in fp32.")
    hint = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained('{out.name}')\n"
        f"tokenizer = AutoTokenizer.from_pretrained('{out.name}')"
    )
    return Exported("hf", out, parity, load, latency * 1000, hint)


# --- Whisper ----------------------------------------------------------------------------------------
def _transcript_tokens(model: SpeechToText) -> int:
    """How many tokens the greedy transcripts of the parity check run to (within the decoder's reach)."""
    whisper: Any = model._whisper
    return max(1, min(32, int(whisper.config.max_target_positions) - 8))


def _transcripts(model: SpeechToText, probe: Probe) -> list[list[int]]:
    with torch.no_grad():
        ids = model.transcribe(probe.inputs["input_features"], _transcript_tokens(model), language=None)
    return ids.tolist()  # type: ignore[no-any-return]


def _save_whisper(model: SpeechToText, trained: Trained, out: Path) -> None:
    whisper: Any = model._whisper
    if whisper.model is not model.backbone:
        whisper.model = model.backbone  # a merged adapter leaves the same modules; keep them in step anyway
    whisper.save_pretrained(out)
    text: Any = trained.objective.tokenizer  # SpeechText: the tokenizer and the clip inputs
    text.tokenizer.save_pretrained(out)
    _save_feature_extractor(text.inputs, out)


def _save_feature_extractor(inputs: Any, out: Path) -> None:
    """The feature extractor, with the run's clip length.

    A stock `WhisperFeatureExtractor` pads to `chunk_length` whole seconds; where the run's window is
    a whole number of seconds that is all it takes. Otherwise `chunk_length` is rounded up and callers
    pass `max_length` (saved as `max_length` in preprocessor_config.json, and in the card's snippet):
    the cut encoder refuses any other number of frames with a clear error.
    """
    extractor = inputs.extractor
    extractor.save_pretrained(out)
    samples, rate = int(inputs.max_samples), int(inputs.rate)
    path = out / "preprocessor_config.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    if "nb_max_frames" in spec:
        spec["chunk_length"] = -(-samples // rate)
        spec["n_samples"] = spec["chunk_length"] * rate
        spec["nb_max_frames"] = spec["n_samples"] // int(spec.get("hop_length", 160))
    spec["max_length"] = samples
    path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def _audio_hint(inputs: Any) -> str:
    samples = int(inputs.max_samples)
    return (
        f"features = processor(audio, sampling_rate={int(inputs.rate)}, max_length={samples}, "
        'padding="max_length", truncation=True, return_tensors="pt")'
    )


def _check_whisper(probe: Probe, out: Path, expected: list[list[int]], tokens: int, extra_hint: str) -> Exported:
    from transformers import WhisperForConditionalGeneration

    started = time.perf_counter()
    hf = WhisperForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    load = time.perf_counter() - started
    inputs = {k: probe.inputs[k] for k in ("input_features", "decoder_input_ids", "decoder_attention_mask")}
    with torch.no_grad():
        logits = hf(**inputs).logits
        got = hf.generate(input_features=inputs["input_features"], max_new_tokens=tokens, do_sample=False, num_beams=1)
        latency = median_seconds(lambda: hf(**inputs), repeats=3) / probe.rows
    parity = compare(probe, logits, TOLERANCE, note="fp32 weights; transcripts compared greedy, token by token.")
    parity.generations_equal = got.tolist() == expected
    hint = (
        "from transformers import WhisperForConditionalGeneration, WhisperProcessor\n"
        f"model = WhisperForConditionalGeneration.from_pretrained('{out.name}')\n"
        f"processor = WhisperProcessor.from_pretrained('{out.name}')"
    ) + extra_hint
    return Exported("hf", out, parity, load, latency * 1000, hint)


# --- classifiers ------------------------------------------------------------------------------------
def _save_classifier(model: Any, kind: str, trained: Trained, out: Path) -> None:
    """config.json (the backbone's own config inside), model.safetensors with tunesmith's parameter
    names (the custom code names its modules the same), the custom code, and the preprocessing."""
    from safetensors.torch import save_model

    out.mkdir(parents=True, exist_ok=True)
    backbone = _plain(model.backbone)
    labels = list(trained.objective.labels) or [f"LABEL_{i}" for i in range(model.head.out_features)]
    labels = labels[: model.head.out_features]
    code = Path(__file__).with_name("hf_remote_code.py").read_text(encoding="utf-8")
    if hasattr(backbone, "config"):
        spec = backbone.config.to_dict()
    else:  # tunesmith's own network (EfficientNet-Lite0): its torch-only file travels with the export
        spec = {"model_type": "tunesmith-network", "name": type(backbone).__name__}
        shutil.copyfile(Path(efficientnet_net.__file__), out / "efficientnet_net.py")
        code += _OWN_NETWORK
    config = {
        "model_type": "tunesmith-classifier",
        "architectures": ["TunesmithClassifier"],
        "auto_map": {
            "AutoConfig": "modeling_tunesmith.TunesmithClassifierConfig",
            _AUTO_CLASSES[kind]: "modeling_tunesmith.TunesmithClassifier",
        },
        "backbone_spec": spec,
        "input_kind": kind,
        "pooling": getattr(model, "pooling", "mean"),
        "feature_dim": model.head.in_features,
        "encoder_only": type(backbone).__name__ == "WhisperEncoder",
        "pooler": getattr(backbone, "pooler", None) is not None,
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / REMOTE_CODE).write_text(code, encoding="utf-8")
    plain = nn.Module()
    plain.backbone, plain.head = backbone, model.head
    save_model(plain, str(out / "model.safetensors"), metadata={"format": "pt"}, force_contiguous=True)
    tokenizer: Any = trained.objective.tokenizer
    if kind == "audio":
        _save_feature_extractor(trained.objective.inputs, out)  # type: ignore[attr-defined]
    elif tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(out)
    if kind == "image":
        _save_image_processor(trained, out)


_OWN_NETWORK = """

from .efficientnet_net import EfficientNetLite0  # shipped beside this file


def _tunesmith_network(spec: dict[str, Any]) -> nn.Module:
    net = EfficientNetLite0()
    net.classifier = nn.Identity()  # the export's head replaces ImageNet's
    return net
"""


def _save_image_processor(trained: Trained, out: Path) -> None:
    """The backbone's image processor, sized to the run's images (`data.image_size`)."""
    pre: Any = trained.objective.preprocessing  # type: ignore[attr-defined]
    spec = {
        "image_processor_type": "ViTImageProcessor",
        "do_resize": True,
        "size": {"height": pre.size, "width": pre.size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [m / 255 for m in pre.mean],
        "image_std": [s / 255 for s in pre.std],
    }
    (out / "preprocessor_config.json").write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")


def _check_classifier(probe: Probe, out: Path, kind: str, extra_hint: str = "") -> Exported:
    import transformers

    auto = getattr(transformers, _AUTO_CLASSES[kind])
    started = time.perf_counter()
    hf = auto.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    load = time.perf_counter() - started
    with torch.no_grad():
        logits = hf(**probe.inputs).logits
        latency = median_seconds(lambda: hf(**probe.inputs), repeats=3) / probe.rows
    parity = compare(probe, logits, TOLERANCE, note="fp32 weights; tunesmith's pooling and head as custom code.")
    hint = (
        f"from transformers import {_AUTO_CLASSES[kind]}\n"
        f"model = {_AUTO_CLASSES[kind]}.from_pretrained('{out.name}', trust_remote_code=True)"
    ) + extra_hint
    return Exported("hf", out, parity, load, latency * 1000, hint)


# --- helpers ----------------------------------------------------------------------------------------
def _plain(backbone: nn.Module) -> Any:
    """The model inside a peft wrapper (itself where there is none)."""
    inner = getattr(getattr(backbone, "base_model", None), "model", None)
    return inner if isinstance(inner, nn.Module) else backbone


def _no_meta(model: nn.Module) -> None:
    left = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise ConfigError(f"the transformers model has parts tunesmith's model lacks: {', '.join(left[:3])}")


def _base_dir(trained: Trained) -> str:
    from tunesmith.models.load import resolve_model_path

    return resolve_model_path(trained.config.model.name)
