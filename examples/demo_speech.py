"""`make demo-speech`: Whisper tiny.en (the packaged CTranslate2 model, converted once) fine-tuned for
keyword spotting on the spoken commands the repo ships (examples/data/spoken-commands: 20 words
spoken by synthetic voices; the voices of the validation and test clips are not in training).

Trains three variants on the same 800 clips and prints, for each, held-out accuracy before (the new
head, untrained) and after: feature extraction, LoRA on the encoder, and full fine-tuning of the
encoder. The encoder is cut to the longest clip (under a second) instead of Whisper's 30 s window.

Then transcription: LoRA on Whisper tiny.en's encoder and decoder, trained on 240 spoken sentences
(examples/data/spoken-sentences), with word and character error rates of greedy transcripts on the
held-out sentences and voices before and after.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import tunesmith
from tunesmith.cli import _quiet_libraries

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
VARIANTS = (
    ("feature extraction", "speech-feature-extraction.yaml"),
    ("LoRA r=8", "speech-lora.yaml"),
    ("full", "speech-full.yaml"),
)


def main() -> int:
    _quiet_libraries()
    console = Console(width=110)
    console.print("[bold]tunesmith speech demo[/bold]: keyword spotting with Whisper tiny.en (20 spoken words)")
    table = Table(title="held-out voices: test clips (200)")
    for column in ("method", "accuracy before", "accuracy after", "macro-F1", "trainable", "train s", "clips/s"):
        table.add_column(column, justify="left" if column == "method" else "right")
    started = time.perf_counter()
    for label, config in VARIANTS:
        console.print(f"[bold]{label}[/bold] ({config})")
        result = tunesmith.train(CONFIGS / config, overrides=sys.argv[1:])
        before, after, info = result.metrics["baseline"]["test"], result.metrics["test"], result.metrics["train"]
        table.add_row(
            label,
            f"{before['accuracy']:.4f}",
            f"{after['accuracy']:.4f}",
            f"{after['macro_f1']:.4f}",
            f"{info['trainable_parameters']:,}",
            f"{info['train_seconds']:.0f}",
            f"{info['samples_per_second']:.0f}",
        )
    console.print(table)
    console.print("[bold]transcription, LoRA r=16[/bold] (speech-transcription.yaml)")
    result = tunesmith.train(CONFIGS / "speech-transcription.yaml", overrides=sys.argv[1:])
    before, after, info = result.metrics["baseline"]["test"], result.metrics["test"], result.metrics["train"]
    words = Table(title="held-out voices and sentences: test clips (30)")
    for column in ("", "WER", "CER"):
        words.add_column(column, justify="right" if column else "left")
    words.add_row("before (Whisper tiny.en)", f"{before['wer']:.3f}", f"{before['cer']:.3f}")
    words.add_row("after LoRA fine-tuning", f"{after['wer']:.3f}", f"{after['cer']:.3f}")
    console.print(words)
    console.print(f"{info['trainable_parameters']:,} trainable parameters, {info['train_seconds']:.0f} s of training")
    console.print(f"wall time: {time.perf_counter() - started:.0f} s; runs are in ./runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
