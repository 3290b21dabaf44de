"""`make demo-rlhf`: learning from preferences, end to end, on the packaged reviews and SmolLM2.

1. A sentiment reward model (MiniLM, scalar head) learns from preference pairs: for the same movie,
   a fresh review is preferred over a rotten one.
2. SmolLM2-135M-Instruct is tuned with LoRA two ways on prompts "Write a short review of the movie
   X.": DPO on the same pairs, and RL (GRPO) sampling reviews and scoring them with the reward model.
3. A separately trained review classifier (MiniLM, classification) judges reviews each policy writes
   for 52 movies none of them trained on: the share judged positive and the mean probability it
   gives "positive", the reward model's mean score, and the KL divergence per token to the base
   model (the LoRA switched off), before and after.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

import tunesmith
from tunesmith.cli import _quiet_libraries
from tunesmith.inference import load_trained
from tunesmith.inference.drift import kl_to_base, sample
from tunesmith.models.generate import Sampling
from tunesmith.zoo import packaged_data_rows

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SAMPLING = Sampling(max_new_tokens=40, temperature=1.0, top_p=1.0, seed=0)


def main() -> int:
    _quiet_libraries()
    console = Console(width=110)
    started = time.perf_counter()
    console.print("[bold]1/4[/bold] the judge: a review classifier (MiniLM, 2,000 reviews)")
    judge = tunesmith.train(
        CONFIGS / "classify-lora.yaml",
        overrides=["data.limit=2000", "train.epochs=1", "eval.baseline=false", "output.name=rlhf-judge"],
    )
    console.print("[bold]2/4[/bold] the reward model (MiniLM, fresh-over-rotten pairs)")
    reward = tunesmith.train(CONFIGS / "reward-reviews.yaml")
    console.print("[bold]3/4[/bold] DPO and RL on SmolLM2 (LoRA)")
    dpo = tunesmith.train(CONFIGS / "dpo-reviews.yaml")
    rl = tunesmith.train(CONFIGS / "rl-reviews.yaml", overrides=[f"rl.reward={reward.run_dir}"])
    console.print("[bold]4/4[/bold] reviews of 52 held-out movies, judged")
    prompts = [row["prompt"] for row, _ in packaged_data_rows("rotten-tomatoes-prompts-held-out")]
    table = Table(title=f"reviews written for {len(prompts)} held-out movies (sampled at temperature 1)")
    for column in ("policy", "judged positive", "P(positive)", "reward (mean)", "KL to base / token", "train s"):
        table.add_column(column, justify="left" if column == "policy" else "right")
    rows = [("base SmolLM2", dpo, True), ("DPO (LoRA)", dpo, False), ("RL, GRPO (LoRA)", rl, False)]
    examples = {}
    for label, result, from_base in rows:
        trained = load_trained(result.run_dir)
        prompt_ids, completions, texts = sample(trained, prompts, SAMPLING, from_base=from_base)
        kl = 0.0 if from_base else kl_to_base(trained, prompt_ids, completions)
        verdicts = tunesmith.predict(judge.run_dir, [t or "." for t in texts])
        positive = sum(v["label"] == "positive" for v in verdicts) / len(verdicts)
        confidence = statistics.mean(v["scores"]["positive"] for v in verdicts)
        scores = tunesmith.score(reward.run_dir, prompts, [t or "." for t in texts])
        seconds = "-" if from_base else f"{result.metrics['train']['train_seconds']:.0f}"
        table.add_row(
            label, f"{positive:.2f}", f"{confidence:.3f}", f"{statistics.mean(scores):+.3f}", f"{kl:.4f}", seconds
        )
        examples[label] = texts[0]
    console.print(table)
    for label, text in examples.items():
        console.print(f"[bold]{label}[/bold] on {prompts[0]!r}: {text.strip()[:200]!r}")
    console.print(f"wall time: {time.perf_counter() - started:.0f} s; runs are in ./runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
