"""Transcription (speech -> text): a Whisper model fine-tuned on `{audio, text}` rows; next-token
loss on the transcript tokens only (the decoder prompt, `<|startoftranscript|>` and friends, is given,
not learned); token loss and perplexity at each evaluation, word and character error rates (jiwer)
of greedy transcripts before and after training.

The decoder is fed the same prompt that Whisper's generation starts from (start of transcript, the
language and task for a multilingual model, no timestamps), then the transcript with a leading space
as Whisper writes it, then end of text. Clips are cut to `data.max_seconds` (default: the longest
training clip) and the encoder with them, as for audio classification.

WER and CER compare lower-cased text with punctuation removed; numbers are not normalised ("5" and
"five" differ), so a model that writes digits where the references spell them out pays for it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from tunesmith.config import DataConfig, Section
from tunesmith.data.audio import AudioExample, decode_audio, default_max_seconds
from tunesmith.data.load import read_audio_examples
from tunesmith.data.quality import QualityReport
from tunesmith.data.quality.audio import check_audio
from tunesmith.errors import ConfigError
from tunesmith.losses.lm import IGNORE
from tunesmith.models.audio import SAVED_INPUTS, AudioInputs, audio_inputs, build_speech_to_text
from tunesmith.models.load import load_tokenizer, resolve_source
from tunesmith.plugins import Method
from tunesmith.registry import register_task
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseObjective, BaseTask

__all__ = ["SpeechText", "TranscriptionConfig", "TranscriptionObjective", "TranscriptionTask", "error_rates"]

Item = dict[str, Any]


class TranscriptionConfig(Section):
    """Speech to text with a Whisper model."""

    language: str = Field(
        "en", description="Language of the speech, for a multilingual Whisper (ignored by English-only models)."
    )


class SpeechText:
    """What a transcription run saves in its tokenizer slot: Whisper's tokenizer (with the decoder
    prompt set) and the clips' inputs (feature extractor and length)."""

    def __init__(self, tokenizer: Any, inputs: AudioInputs) -> None:
        self.tokenizer = tokenizer
        self.inputs = inputs

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(directory)
        self.inputs.save_pretrained(directory)


@register_task("transcription")
class TranscriptionTask(BaseTask):
    """Clip -> transcript: a Whisper model fine-tuned on its own output layer."""

    name = "transcription"
    summary = "speech -> text (Whisper); WER and CER"
    section = TranscriptionConfig
    headline = ("wer", "cer")
    labelled = False
    output = "transcript"

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self._text: SpeechText | None = None

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[AudioExample]:
        return read_audio_examples(source, data, "text", require=targets)

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        held = [e for r in references for e in self.read_examples(r, data, targets=False)]
        if isinstance(tokenizer, SpeechText):
            rate, text_tokenizer = tokenizer.inputs.rate, tokenizer.tokenizer

            def length(text: str) -> int:
                return len(_target_ids(text_tokenizer, text))
        else:  # no model given: 16 kHz, and transcripts counted in words (+ end of text)
            rate = 16000

            def length(text: str) -> int:
                return len(text.split()) + 1

        examples = self.read_examples(source, data, targets=False)  # rows without a transcript are counted
        return check_audio(examples, held, data, source, self.name, rate, data.max_seconds, length)

    def load_tokenizer(self, saved: Path | None = None) -> SpeechText:
        """Whisper's tokenizer and the clips' inputs: those saved with a run, else the model's (clips
        as long as `data.max_seconds`, or the longest training clip)."""
        from transformers import AutoTokenizer

        if saved is not None and (saved / SAVED_INPUTS).is_file():
            seconds = float(json.loads((saved / SAVED_INPUTS).read_text())["max_seconds"])
            self._text = SpeechText(AutoTokenizer.from_pretrained(saved), audio_inputs(self.cfg.model, seconds, saved))
        return self.speech_text()

    def speech_text(self) -> SpeechText:
        if self._text is None:
            d = self.cfg.data
            seconds = d.max_seconds or default_max_seconds(self.read_examples(d.train, d, targets=False))
            self._text = SpeechText(load_tokenizer(self.cfg.model, "speech"), audio_inputs(self.cfg.model, seconds))
        language = self.cfg.section(self.name).language
        if getattr(self._text.tokenizer, "set_prefix_tokens", None) is not None:
            prompt = {"language": language, "task": "transcribe"} if self._multilingual() else {}
            self._text.tokenizer.set_prefix_tokens(predict_timestamps=False, **prompt)
        return self._text

    def _multilingual(self) -> bool:
        """Whether the model's generation config says it is multilingual (its prompt names the language)."""
        from transformers import GenerationConfig

        try:
            generation = GenerationConfig.from_pretrained(resolve_source(self.cfg.model, "speech"))
        except OSError:
            return False
        return bool(getattr(generation, "is_multilingual", False))

    def check_method(self, method: Method) -> None:
        if method.frozen_backbone:
            raise ConfigError(
                f"method.name={method.name} trains only a new head, and transcription gets none (Whisper's output "
                "layer is the pre-trained one, tied to the decoder's embeddings); use lora, partial, adapter, ia3 "
                "or full"
            )
        if method.virtual_tokens:
            raise ConfigError(
                f"method.name={method.name} learns virtual tokens in front of a text input; Whisper's decoder starts "
                "from a fixed prompt and attends to the audio. Use lora, partial, adapter, ia3 or full"
            )

    def build_model(self, num_labels: int) -> nn.Module:
        return build_speech_to_text(self.cfg.model, self.speech_text().inputs)

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> TranscriptionObjective:
        text = tokenizer if isinstance(tokenizer, SpeechText) else self.speech_text()
        return TranscriptionObjective(text, self.cfg.data.max_length)

    def plan(self, objective: Any) -> dict[str, Any]:
        inputs = objective.text.inputs
        prompt = objective.text.tokenizer.convert_ids_to_tokens(objective.prompt)
        return {"audio": {"max_seconds": round(inputs.max_seconds, 3), "input": inputs.describe()}, "prompt": prompt}

    def answers(
        self, model: nn.Module, objective: Any, examples: Sequence[Any], runtime: Runtime, limit: int | None
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """WER and CER of greedy transcripts against the references (up to `limit` clips)."""
        rows = [e for e in (examples[:limit] if limit else examples) if e.text]
        if not rows:
            return {}, []
        heard = self.transcribe_examples(model, objective, rows, runtime)
        records = [{"audio": e.where, "reference": e.text, "transcript": h} for e, h in zip(rows, heard, strict=True)]
        return error_rates([e.text or "" for e in rows], heard), records

    def transcribe_examples(
        self, model: Any, objective: Any, examples: Sequence[AudioExample], runtime: Runtime
    ) -> list[str]:
        """Greedy transcripts of `examples`, in order."""
        inputs, tokenizer = objective.text.inputs, objective.text.tokenizer
        device = next(model.parameters()).device
        language = self.cfg.section(self.name).language
        out: list[str] = []
        for start in range(0, len(examples), runtime.eval_batch_size):
            batch = examples[start : start + runtime.eval_batch_size]
            waves = [decode_audio(e.audio, inputs.rate, e.where) for e in batch]
            features = inputs.batch(waves)["input_features"].to(device)
            with runtime.autocast():
                ids = model.transcribe(features, self.cfg.eval.max_new_tokens, language)
            out += [t.strip() for t in tokenizer.batch_decode(ids, skip_special_tokens=True)]
        return out

    def predict(self, trained: Any, inputs: list[str] | None, data: str | None, runtime: Runtime) -> list[dict]:
        """The transcript of each clip (paths in `inputs`, or every row of `data`)."""
        if data is not None:
            examples = self.read_examples(data, trained.config.data, targets=False)
        else:
            examples = [AudioExample(str(Path(p).expanduser()), where=p) for p in inputs or []]
        heard = self.transcribe_examples(trained.model, trained.objective, examples, runtime)
        return [{"audio": e.where, "text": h} for e, h in zip(examples, heard, strict=True)]


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Word and character error rates (jiwer) over all rows, after lower-casing and removing punctuation."""
    import jiwer

    refs = [_normal(r) for r in references]
    hyps = [_normal(h) for h in hypotheses]
    keep = [i for i, r in enumerate(refs) if r]
    if not keep:
        return {}
    refs, hyps = [refs[i] for i in keep], [hyps[i] for i in keep]
    return {"wer": float(jiwer.wer(refs, hyps)), "cer": float(jiwer.cer(refs, hyps))}


def _normal(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def _target_ids(tokenizer: Any, text: str) -> list[int]:
    """The transcript's tokens as Whisper writes them (a leading space), then end of text."""
    return [*tokenizer(" " + text.strip(), add_special_tokens=False).input_ids, tokenizer.eos_token_id]


class TranscriptionObjective(BaseObjective):
    default_metric = "loss"

    def __init__(self, text: SpeechText, max_length: int) -> None:
        super().__init__(text)  # saved with the run: the tokenizer and the clips' inputs
        self.text = text
        self.max_length = max_length
        self.prompt: list[int] = list(text.tokenizer.prefix_tokens)
        self.pad_id = int(text.tokenizer.eos_token_id)

    def encode(
        self, examples: Sequence[AudioExample], split: str = "train", pack_rows: bool = False, chunk: int = 0
    ) -> list[Item]:
        """Items that point at their clips, with the decoder's tokens: the prompt, the transcript and
        end of text (transcripts longer than `data.max_length` tokens are cut, and counted)."""
        items: list[Item] = []
        cut = 0
        for e in examples:
            target = _target_ids(self.text.tokenizer, e.text or "") if e.text else []
            if len(target) > self.max_length:
                target, cut = target[: self.max_length], cut + 1
            items.append({"audio": e.audio, "where": e.where, "ids": self.prompt + target})
        self.counts[split] = {"read": len(examples), "kept": len(items), "truncated": cut, "dropped": 0}
        return items

    @staticmethod
    def length(item: Item) -> int:
        return len(item["ids"])

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Decode and featurize the clips; the decoder's input (all tokens but the last) and labels
        (all but the first, the prompt's masked with IGNORE), padded."""
        waves = [decode_audio(it["audio"], self.text.inputs.rate, it.get("where", "")) for it in items]
        features = self.text.inputs.batch(waves)["input_features"]
        width = max(len(it["ids"]) for it in items) - 1
        inputs = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        given = len(self.prompt) - 1  # label positions that predict the rest of the prompt
        for row, it in enumerate(items):
            ids = torch.tensor(it["ids"], dtype=torch.long)
            n = len(ids) - 1
            inputs[row, :n], mask[row, :n] = ids[:-1], 1
            labels[row, given:n] = ids[1 + given :]
        return {
            "input_features": features,
            "decoder_input_ids": inputs,
            "decoder_attention_mask": mask,
            "labels": labels,
        }

    @staticmethod
    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE)

    def new_metrics(self) -> TokenMetrics:
        return TokenMetrics()


class TokenMetrics:
    """Mean transcript-token loss, perplexity and next-token accuracy."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.tokens = 0
        self.correct = 0

    def update_batch(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> None:
        labels = batch["labels"].to(logits.device)
        keep = labels != IGNORE
        self.loss_sum += float(F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum"))
        self.correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
        self.tokens += int(keep.sum())

    def compute(self) -> dict[str, Any]:
        loss = self.loss_sum / max(self.tokens, 1)
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": self.correct / max(self.tokens, 1),
            "tokens": self.tokens,
        }
