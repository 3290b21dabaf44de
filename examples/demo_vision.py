"""`make demo-vision`: EfficientNet-Lite0 (ImageNet weights) fine-tuned on the packaged MNIST digits.

Trains four variants on the same 4,500 digits with the same budget and prints their accuracy on
the same 500 held-out digits: feature extraction, partial fine-tuning and full fine-tuning of the
pre-trained network, and the same network trained from random initialisation with the full
fine-tuning settings. The gap between the last two rows is what pre-training brings.
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
    ("feature extraction", "ImageNet", "image-feature-extraction.yaml", []),
    ("partial (stages 5-6)", "ImageNet", "image-partial.yaml", []),
    ("full", "ImageNet", "image-full.yaml", []),
    ("full", "random", "image-full.yaml", ["model.pretrained=false", "output.name=image-full-random"]),
)


def main() -> int:
    _quiet_libraries()
    console = Console(width=110)
    console.print("[bold]tunesmith vision demo[/bold]: EfficientNet-Lite0 on MNIST (5,000 digits, 64x64 inputs)")
    table = Table(title="held-out digits (500)")
    for column in ("method", "weights", "accuracy", "top-5", "macro-F1", "trainable", "epochs", "train s", "images/s"):
        table.add_column(column, justify="left" if column in ("method", "weights") else "right")
    started = time.perf_counter()
    for label, weights, config, overrides in VARIANTS:
        console.print(f"[bold]{label}, {weights} weights[/bold] ({config} {' '.join(overrides)})")
        result = tunesmith.train(CONFIGS / config, overrides=[*overrides, *sys.argv[1:]])
        val, info = result.metrics["validation"], result.metrics["train"]
        epochs = tunesmith.load_config(CONFIGS / config, overrides).train.epochs
        table.add_row(
            label,
            weights,
            f"{val['accuracy']:.4f}",
            f"{val['top5_accuracy']:.4f}",
            f"{val['macro_f1']:.4f}",
            f"{info['trainable_parameters']:,}",
            f"{epochs:g}",
            f"{info['train_seconds']:.0f}",
            f"{info['samples_per_second']:.0f}",
        )
    console.print(table)
    console.print(f"wall time: {time.perf_counter() - started:.0f} s; runs are in ./runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
