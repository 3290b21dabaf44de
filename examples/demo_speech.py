"""`make demo-speech`: Whisper tiny.en (the packaged CTranslate2 model, converted once) fine-tuned for
keyword spotting on the spoken commands the repo ships (examples/data/spoken-commands: 20 words
spoken by synthetic voices; the voices of the validation and test clips are not in training).

Trains three variants on the same 800 clips and prints, for each, held-out accuracy before (the new
head, untrained) and after: feature extraction, LoRA on the encoder, and full fine-tuning of the
encoder. The encoder is cut to the longest clip (under a second) instead of Whisper's 30 s window.
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
    console.print(f"wall time: {time.perf_counter() - started:.0f} s; runs are in ./runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
