"""`--format peft`: an adapter directory that plain peft loads onto the base model.

`adapter_config.json` + `adapter_model.safetensors`, with the key names peft writes for the base as
its users load it (`base_model.model.<path in the base>.lora_A.weight`, the adapter name stripped):
- a causal LM: the base is the model itself (`AutoModelForCausalLM.from_pretrained(base)`); tunesmith
  trained the adapter on its decoder, so keys gain the decoder's place in the full model (`model.`)
  and the config says `task_type: CAUSAL_LM`, which also makes prompt and prefix tuning generate;
- a run whose base differs from the files it started from (a classifier's new head, a Whisper encoder
  cut to short clips) ships that base beside the adapter, in `base/` (the hf form, with the base's
  original weights and an untrained head); the trained head travels in the adapter as
  `modules_to_save`, as peft does for heads it trains.

Runs whose method is not a peft adapter (full, partial, feature extraction, bottleneck adapters)
refuse, pointing to `--format hf` or `onnx`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.exports import Exported
from tunesmith.exports.hf import _AUTO_CLASSES, _CLASSIFIERS, REMOTE_CODE, _save_classifier, _save_whisper
from tunesmith.exports.parity import Probe, compare, greedy, median_seconds
from tunesmith.inference import Trained
from tunesmith.models.audio import SpeechToText
from tunesmith.models.causal_lm import CausalLM
from tunesmith.models.load import resolve_model_path

__all__ = ["check", "export"]

TOLERANCE = 1e-3  # the same fp32 weights and the same adapter arithmetic


def check(trained: Trained, quantize: str | None) -> None:
    """Refuse, in one line, runs whose change is not a peft adapter."""
    method, model = trained.method, trained.model
    if not method.peft_adapter:
        fix = "--format onnx" if not method.standard_layers else "--format hf"
        raise ConfigError(f"{trained.where}: {method.name} trains no peft adapter; export it with {fix}")
    if method.virtual_tokens and not isinstance(model, CausalLM):
        raise ConfigError(
            f"{trained.where}: {method.name} on a {type(model).__name__} prepends virtual tokens inside tunesmith's "
            "classifier, which peft cannot wrap as a whole; export a LoRA or IA3 run, or use --format onnx"
        )


def export(trained: Trained, probe: Probe, out: Path, quantize: str | None) -> Exported:
    model: Any = trained.model
    model.backbone.save_pretrained(out, safe_serialization=True)
    if isinstance(model, CausalLM):
        base_path = resolve_model_path(trained.config.model.name)
        _rewrite(out, prefix=_prefix_of_causal_lm(model), task_type="CAUSAL_LM", base=base_path)
        return _check(probe, out, base_path, "causal-lm")
    head = [] if isinstance(model, SpeechToText) else ["head"]
    if head:
        _save_head(model, out)
    prefix = "model." if isinstance(model, SpeechToText) else "backbone."
    _rewrite(out, prefix=prefix, task_type=None, base="base", modules_to_save=head)
    model.backbone = model.backbone.unload()  # the base's own weights, the adapter taken out
    base = out / "base"
    if isinstance(model, SpeechToText):
        _save_whisper(model, trained, base)
        return _check(probe, out, str(base), "whisper")
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)  # the base's head is untrained: the adapter carries the trained one
    kind = next(k for cls, k in _CLASSIFIERS.items() if isinstance(model, cls))
    _save_classifier(model, kind, trained, base)
    return _check(probe, out, str(base), kind)


def _prefix_of_causal_lm(model: CausalLM) -> str:
    from transformers import AutoModelForCausalLM

    decoder: Any = model.backbone.get_base_model()  # type: ignore[operator]
    with torch.device("meta"):
        full: Any = AutoModelForCausalLM.from_config(decoder.config)
    return f"{full.base_model_prefix}."


def _rewrite(
    out: Path, prefix: str, task_type: str | None, base: str, modules_to_save: list[str] | None = None
) -> None:
    """Re-key the adapter for the base as plain peft users load it, and say what that base is."""
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    head = {k: v for k, v in tensors.items() if k.startswith("head.")}
    renamed = {
        (k.replace("base_model.model.", f"base_model.model.{prefix}", 1) if k.startswith("base_model.model.") else k): v
        for k, v in tensors.items()
        if not k.startswith("head.")
    }
    renamed |= {f"base_model.model.{k}": v for k, v in head.items()}
    save_file(renamed, str(weights), metadata={"format": "pt"})
    config_path = out / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["task_type"] = task_type
    config["base_model_name_or_path"] = base
    if modules_to_save:
        config["modules_to_save"] = modules_to_save
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _save_head(model: Any, out: Path) -> None:
    """Add the trained head to the adapter's weights (re-keyed by `_rewrite`)."""
    weights = out / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    tensors |= {f"head.{k}": v.detach().clone().contiguous() for k, v in model.head.state_dict().items()}
    save_file(tensors, str(weights), metadata={"format": "pt"})


def _check(probe: Probe, out: Path, base_path: str, kind: str) -> Exported:
    import transformers
    from peft import PeftModel

    started = time.perf_counter()
    if kind == "causal-lm":
        base: Any = transformers.AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        load_base = f"AutoModelForCausalLM.from_pretrained('{base_path}')"
        auto = "AutoModelForCausalLM"
    elif kind == "whisper":
        base = transformers.WhisperForConditionalGeneration.from_pretrained(base_path, dtype=torch.float32)
        load_base = f"WhisperForConditionalGeneration.from_pretrained('{out.name}/base')"
        auto = "WhisperForConditionalGeneration"
    else:
        auto = _AUTO_CLASSES[kind]
        base = getattr(transformers, auto).from_pretrained(base_path, trust_remote_code=True, dtype=torch.float32)
        load_base = f"{auto}.from_pretrained('{out.name}/base', trust_remote_code=True)"
    model: Any = PeftModel.from_pretrained(base, str(out)).eval()
    load = time.perf_counter() - started
    inputs = dict(probe.inputs)
    if kind == "causal-lm":
        inputs = {k: inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = _logits(model(**inputs), probe)
        generations = [greedy(model, p, probe) for p in probe.prompts] if kind == "causal-lm" else None
        latency = median_seconds(lambda: model(**inputs), repeats=3) / probe.rows
    parity = compare(probe, logits, TOLERANCE, generations, note="fp32 base with the adapter applied by peft.")
    hint = f"from peft import PeftModel\nfrom transformers import {auto}\nbase = {load_base}\n"
    hint += f"model = PeftModel.from_pretrained(base, '{out.name}')"
    if kind not in ("causal-lm", "whisper"):
        hint += f"\n# base/ ships tunesmith's classifier form ({REMOTE_CODE}) with the base weights and no trained head"
    return Exported("peft", out, parity, load, latency * 1000, hint)


def _logits(output: Any, probe: Probe) -> torch.Tensor:
    logits = output.logits
    if logits.ndim == 3 and logits.shape[1] > probe.logits.shape[1]:
        logits = logits[:, -probe.logits.shape[1] :]  # prompt tuning's virtual tokens come first
    return logits  # type: ignore[no-any-return]
