"""Audio classification (keyword spotting, spoken commands, sound classes): a clip -> one of a set of
labels, through a new head on a pre-trained speech encoder (Whisper's, or wav2vec2/HuBERT/WavLM);
cross-entropy; accuracy, macro-F1, confusion matrix.

Items keep a reference to their clip and decode it when their batch is built, so memory does not
grow with the data set. Every clip is padded (or cut) to `data.max_seconds` and Whisper's encoder is
cut to that length (tunesmith.models.audio), so a one-second keyword costs a second of compute. By
default `max_seconds` is the longest training clip, rounded up to a tenth of a second; it is saved
with the run, so a trained run rebuilds the same model wherever it is loaded.

Its data gate decodes every clip once before training (tunesmith.data.quality.audio).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config import DataConfig
from tunesmith.data.audio import AudioExample, decode_audio, default_max_seconds
from tunesmith.data.load import read_audio_examples
from tunesmith.data.quality import QualityReport
from tunesmith.data.quality.audio import check_audio
from tunesmith.errors import ConfigError
from tunesmith.eval.evaluate import predict_items
from tunesmith.eval.metrics import ConfusionMetrics
from tunesmith.models.audio import SAVED_INPUTS, AudioInputs, audio_inputs, build_audio_classifier
from tunesmith.plugins import Method
from tunesmith.registry import register_task
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseObjective, BaseTask, label_rows
from tunesmith.training.input_cache import cache_input_features, cache_input_states

__all__ = ["AudioClassificationObjective", "AudioClassificationTask"]

Item = dict[str, Any]


@register_task("audio-classification")
class AudioClassificationTask(BaseTask):
    """Clip -> label: a new head on a pre-trained speech encoder."""

    name = "audio-classification"
    summary = "audio clip -> label (keyword spotting, commands, sound classes)"
    headline = ("accuracy", "macro_f1")
    labelled = True
    output = "label"
    retention_metrics = ("accuracy",)

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._inputs: AudioInputs | None = None

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[AudioExample]:
        return read_audio_examples(source, data, "label", require=targets)

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        held = [e for r in references for e in self.read_examples(r, data)]
        inputs = tokenizer if isinstance(tokenizer, AudioInputs) else None
        rate = inputs.rate if inputs is not None else 16000
        return check_audio(self.read_examples(source, data), held, data, source, self.name, rate, data.max_seconds)

    def load_tokenizer(self, saved: Path | None = None) -> AudioInputs:
        """The clips' feature extractor and length (in place of a tokenizer): the run's saved one, else
        the model's with `data.max_seconds` (or the longest training clip)."""
        if saved is not None and (saved / SAVED_INPUTS).is_file():
            seconds = float(json.loads((saved / SAVED_INPUTS).read_text())["max_seconds"])
            self._inputs = audio_inputs(self.cfg.model, seconds, saved)
        return self.inputs()

    def inputs(self) -> AudioInputs:
        if self._inputs is None:
            d = self.cfg.data
            seconds = d.max_seconds or default_max_seconds(self.read_examples(d.train, d, targets=False))
            self._inputs = audio_inputs(self.cfg.model, seconds)
        return self._inputs

    def check_method(self, method: Method) -> None:
        if method.virtual_tokens:
            raise ConfigError(
                f"method.name={method.name} learns virtual tokens in front of a text input; a speech encoder "
                "takes sound, not tokens. Use feature-extraction, partial, lora, adapter, ia3 or full"
            )

    def build_model(self, num_labels: int) -> nn.Module:
        return build_audio_classifier(self.cfg.model, num_labels, self.cfg.train.seed, self.inputs())

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> AudioClassificationObjective:
        return AudioClassificationObjective(labels, tokenizer if isinstance(tokenizer, AudioInputs) else self.inputs())

    def plan(self, objective: Any) -> dict[str, Any]:
        return {"audio": {"max_seconds": round(objective.inputs.max_seconds, 3), "input": objective.inputs.describe()}}

    def predict(self, trained: Any, inputs: list[str] | None, data: str | None, runtime: Runtime) -> list[dict]:
        if data is not None:
            examples = self.read_examples(data, trained.config.data, targets=False)
        else:
            examples = [AudioExample(str(Path(p).expanduser()), where=p) for p in inputs or []]
        objective = trained.objective
        probs = predict_items(trained.model, objective, objective.encode(examples), runtime)
        return label_rows(examples, probs, objective.labels, lambda e: {"audio": e.where})


class AudioClassificationObjective(BaseObjective):
    default_metric = "accuracy"

    def __init__(self, labels: Sequence[str], inputs: AudioInputs) -> None:
        super().__init__(inputs, labels)  # the "tokenizer" slot saves the clips' inputs with the run
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.inputs = inputs

    def encode(
        self, examples: Sequence[AudioExample], split: str = "train", pack_rows: bool = False, chunk: int = 0
    ) -> list[Item]:
        """Items that point at their clips (nothing is decoded here)."""
        return [
            {"audio": e.audio, "where": e.where, "label": self.index[e.label] if e.label is not None else -1}
            for e in examples
        ]

    @staticmethod
    def length(item: Item) -> int:
        return 1  # every clip becomes the same input length: nothing to group by length

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Decode and featurize a batch (see `AudioInputs.batch`), or stack cached features (B, D) /
        states (B, P, D) with their frame counts."""
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if "features" in items[0]:
            return {"features": torch.stack([it["features"] for it in items]), "labels": labels}
        if "hidden" in items[0]:
            return {
                "hidden": torch.stack([it["hidden"] for it in items]),
                "frames": torch.stack([torch.as_tensor(it["frames"]) for it in items]),
                "start_block": torch.tensor(items[0]["start_block"]),
                "labels": labels,
            }
        waves = [decode_audio(it["audio"], self.inputs.rate, it.get("where", "")) for it in items]
        return {**self.inputs.batch(waves), "labels": labels}

    @staticmethod
    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def new_metrics(self) -> ConfusionMetrics:
        return ConfusionMetrics(self.labels, top_k=5)

    def cache_frozen(
        self,
        model: Any,
        items: Sequence[Item],
        k: int | None,
        runtime: Runtime,
        max_bytes: int,
        spill_dir: Path,
        name: str,
    ) -> list[Item]:
        """Items with the frozen part's output in place of the clip: pooled features when nothing before
        the head trains (`k` None), else the states entering block `k` (unchanged where the encoder
        cannot start there)."""
        described = self.inputs.describe().encode()
        keys = [hashlib.sha256(it_key(it).encode() + described).hexdigest() for it in items]
        args = (runtime.eval_batch_size, runtime.autocast, max_bytes, spill_dir, name)
        if k is None:
            return cache_input_features(model, items, keys, self.collate, *args)
        main = "input_features" if self.inputs.kind == "log-mel" else "input_values"
        cached = cache_input_states(model, items, keys, self.collate, main, *args, k)
        return list(items) if cached is None else cached


def it_key(item: Item) -> str:
    """The content key of an item's clip."""
    return AudioExample(item["audio"]).key()
