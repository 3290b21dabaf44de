"""`make demo-sft`: LoRA instruction tuning of SmolLM2-135M-Instruct on the packaged reviews.

Every review becomes a question ("Is this movie review positive or negative? ...") whose answer is
"positive" or "negative". Prints the held-out exact-match accuracy of greedy answers and the
answer loss before and after training, the time taken, and a few answers before and after.
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

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "sft-lora.yaml"


def main() -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _quiet_libraries()
    console = Console()
    console.print(f"[bold]tunesmith SFT demo[/bold]: {CONFIG.name} (LoRA, SmolLM2-135M-Instruct, review questions)")
    started = time.perf_counter()
    result = tunesmith.train(CONFIG, overrides=sys.argv[1:])
    wall = time.perf_counter() - started
    before, after, info = (
        result.metrics["baseline"]["validation"],
        result.metrics["validation"],
        result.metrics["train"],
    )

    table = Table(title=f"held-out review questions ({after['answered']} answered greedily)")
    for column in ("", "exact match", "answer loss", "perplexity"):
        table.add_column(column, justify="right" if column else "left")
    for name, m in (("before (SmolLM2-135M-Instruct)", before), ("after LoRA instruction tuning", after)):
        table.add_row(name, f"{m['exact_match']:.3f}", f"{m['loss']:.4f}", f"{m['perplexity']:.3f}")
    console.print(table)
    answers = Table(title="answers to the first held-out questions (after training)")
    answers.add_column("review")
    answers.add_column("answer")
    for sample in _last_samples(result.run_dir):
        review = sample["prompt"].split("Review: ", 1)[-1]
        answers.add_row(review[:90] + ("…" if len(review) > 90 else ""), sample["output"])
    console.print(answers)
    console.print(f"trainable parameters: {info['trainable_parameters']:,}")
    console.print(
        f"training: {info['steps']} steps, {info['tokens_per_second']:.0f} tokens/s, "
        f"{info['train_seconds']:.0f} s ({info['precision']})"
    )
    console.print(f"wall time: {wall:.0f} s   peak memory: {info['peak_rss_mb']:.0f} MB")
    console.print(f"run directory: {result.run_dir}")
    console.print(f'try: tunesmith generate {result.run_dir} "Is this movie review positive or negative? ..."')
    return 0


def _last_samples(run_dir: Path) -> list[dict[str, str]]:
    from tunesmith.runs import open_run

    logged = [m for m in open_run(run_dir).metrics() if m.get("kind") == "samples"]
    return logged[-1]["samples"] if logged else []


if __name__ == "__main__":
    raise SystemExit(main())
