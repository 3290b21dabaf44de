"""Benchmark: tunesmith against the Hugging Face Trainer + peft on LoRA instruction tuning.

Both sides LoRA-tune the packaged SmolLM2-135M-Instruct (the GGUF de-quantized to fp32 once, the
same directory for both) with rank 8, alpha 16, dropout 0.05 on every linear layer of the 30
decoder blocks, batch 8, max length 256, lr 2e-4, linear schedule, warmup ratio 0.06, weight decay
0.01, max grad norm 1.0, seed 42, 1 epoch.

Data: rows built from the packaged Rotten Tomatoes reviews, "Write a positive|negative review of
the movie X." -> the review, sorted by the SHA-1 of the review and cut to `--rows`. tunesmith
renders them with SmolLM2's chat template and masks the prompt (data/sft.py); the reference gets
exactly those token ids, with labels -100 on the prompt tokens, so both train on the same tokens.
The reference pads each batch to its longest row (its standard collator) and groups batches by
length, as tunesmith does.

Measurement (as bench/classification.py; the shared pieces are in bench/harness.py): every (tool,
repeat) in a fresh subprocess, tools alternating and the order rotating each repeat, the harness
waiting for an idle machine first.
Training time: wall time of `trainer.train()` (reference) or tunesmith's `train_seconds`.
Tokens/s: non-pad tokens of the training rows / seconds (same formula for both). Peak memory:
ru_maxrss of the worker. Training loss: the mean loss over all steps of the epoch (Trainer's
`training_loss`; the mean of tunesmith's per-step `metrics.jsonl` losses with `log_every: 1`).

MFU = useful FLOPs / seconds / peak, the peak being this machine's 2048² matmul rate at the run's
precision, measured before the runs (bench/harness.py `matmul_peak`). Useful FLOPs per epoch:
4 N T (forward 2N, backward 2N for activation gradients through frozen weights) + 6 N_lora T
+ 4 H V T_trained (the output layer, forward and its input gradient, on trained tokens only; what
the reference spends on prompt positions is not useful work). N = matmul weights in the blocks.

`tunesmith-lean` is tunesmith with `train.trim_memory_every: 3` (memory handed back to the system
after every third block: a lower peak for more step time; the default trims only when memory is short).

Run: `python bench/sft.py [--repeats 3] [--rows 256] [--tools tunesmith,tunesmith-lean,reference-bf16]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from harness import matmul_peak, own_cpu_seconds, peak_rss_mb, rotated, run_measured, wait_for_idle, worker_env

SEED = 42
MAX_LENGTH = 256
BATCH_SIZE = 8
LR = 2e-4
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
TOOLS = ["reference-fp32", "tunesmith", "reference-bf16"]  # also: tunesmith-lean
RESULTS = Path(__file__).resolve().parent / "results"


def build_rows(n: int) -> list[dict[str, str]]:
    from tunesmith.zoo import packaged_data_rows

    rows, seen = [], set()
    for record, _ in packaged_data_rows("rotten-tomatoes"):
        if record["text"] in seen or len(record["text"]) < 40:
            continue
        seen.add(record["text"])
        prompt = f"Write a {record['label']} review of the movie {record['movie'].replace('_', ' ')}."
        rows.append({"prompt": prompt, "completion": record["text"]})
    rows.sort(key=lambda r: hashlib.sha1(r["completion"].encode()).hexdigest())
    return rows[:n]


def encode_rows(rows: list[dict[str, str]], model_dir: str) -> list[dict[str, list[int]]]:
    """tunesmith's rendering and masking, given to the reference as token ids and labels."""
    from transformers import AutoTokenizer

    from tunesmith.data.readers import Row
    from tunesmith.data.sft import to_sft_examples
    from tunesmith.data.templates import encode_examples

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = to_sft_examples([Row(r, f"row {i}") for i, r in enumerate(rows)])
    encoded, _ = encode_examples(examples, tokenizer, "auto", False, MAX_LENGTH, "truncate")
    return [{"input_ids": e.input_ids, "targets": e.targets} for e in encoded]


def run_reference(variant: str, data: Path, model_dir: str) -> dict[str, Any]:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    torch.manual_seed(SEED)
    encoded = json.loads(data.read_text())
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = peft.LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(model, lora)
    rows = [
        {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, e["targets"], strict=True)]}
        for e in encoded
        for ids in [e["input_ids"]]
    ]
    # labels are the ids themselves (the model shifts them); the first token's target flag is 0 already.
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        use_cpu=True,
        bf16=variant == "bf16",
        per_device_train_batch_size=BATCH_SIZE,
        num_train_epochs=1,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0.06,
        weight_decay=0.01,
        max_grad_norm=1.0,
        seed=SEED,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        train_sampling_strategy="group_by_length",
    )

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), 2, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collate)
    start = time.perf_counter()
    result = trainer.train()
    return {"train_seconds": time.perf_counter() - start, "train_loss": result.training_loss, "precision": variant}


def run_tunesmith(data: Path, rows_file: Path, lean: bool = False) -> dict[str, Any]:
    import tunesmith

    out = tempfile.mkdtemp()
    result = tunesmith.train(
        model="smollm2-135m",
        task="sft",
        method={"name": "lora", **LORA},
        data={"train": str(rows_file), "validation": None, "max_length": MAX_LENGTH},
        train={"epochs": 1, "lr": LR, "batch_size": BATCH_SIZE, "seed": SEED, "log_every": 1}
        | ({"trim_memory_every": 3} if lean else {}),
        eval={"samples": 0},
        output=out,
    )
    losses = [
        json.loads(line)["loss"]
        for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()
        if json.loads(line).get("kind") == "train"
    ]
    info = result.metrics["train"]
    return {
        "train_seconds": info["train_seconds"],
        "train_loss": statistics.mean(losses),
        "precision": info["precision"],
    }


def worker(tool: str, data_dir: Path, out: Path) -> None:
    from tunesmith.models.load import resolve_model_path

    meta = json.loads((data_dir / "meta.json").read_text())
    if tool.startswith("tunesmith"):
        result = run_tunesmith(data_dir / "encoded.json", data_dir / "rows.jsonl", lean=tool == "tunesmith-lean")
    else:
        result = run_reference(tool.split("-")[1], data_dir / "encoded.json", resolve_model_path("smollm2-135m"))
    result.update(
        tool=tool,
        tokens_per_second=meta["tokens"] / result["train_seconds"],
        peak_rss_mb=peak_rss_mb(),
        cpu_seconds=own_cpu_seconds(),
    )
    out.write_text(json.dumps(result))


def spawn(tool: str, data_dir: Path, repeat: int) -> dict[str, Any]:
    out = data_dir / f"{tool}-{repeat}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        tool,
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
    ]
    proc, result = run_measured(cmd, worker_env(TOKENIZERS_PARALLELISM="false"), out, repeat)
    if result is None:
        print(f"  FAILED {tool}:\n{(proc.stderr or proc.stdout)[-3000:]}", file=sys.stderr)
        return {"tool": tool, "repeat": repeat, "error": True}
    return result


def useful_flops(meta: dict[str, Any]) -> float:
    hidden, inter, layers, kv = 576, 1536, 30, 192
    per_block = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    n = layers * per_block
    n_lora = layers * LORA["r"] * (2 * (hidden + hidden) + 2 * (hidden + kv) + 2 * (hidden + inter) + (inter + hidden))
    return 4 * n * meta["tokens"] + 6 * n_lora * meta["tokens"] + 4 * hidden * 49152 * meta["trained_tokens"]


def prepare(rows: int) -> Path:
    from tunesmith.models.load import resolve_model_path

    data_dir = Path(tempfile.mkdtemp(prefix="bench-sft-"))
    built = build_rows(rows)
    (data_dir / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in built))
    encoded = encode_rows(built, resolve_model_path("smollm2-135m"))
    (data_dir / "encoded.json").write_text(json.dumps(encoded))
    meta = {
        "rows": len(encoded),
        "tokens": sum(len(e["input_ids"]) for e in encoded),
        "trained_tokens": sum(sum(e["targets"]) for e in encoded),
    }
    (data_dir / "meta.json").write_text(json.dumps(meta))
    return data_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--worker")
    parser.add_argument("--data-dir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.data_dir, args.out)
        return 0
    tools = args.tools.split(",")
    data_dir = prepare(args.rows)
    meta = json.loads((data_dir / "meta.json").read_text())
    print(f"{meta['rows']} rows, {meta['tokens']} tokens ({meta['trained_tokens']} trained)", flush=True)
    wait_for_idle(120)
    peak = matmul_peak()
    print(f"matmul peak (2048²): {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} bf16", flush=True)
    runs = []
    for repeat in range(args.repeats):
        order = rotated(tools, repeat)
        for tool in order:
            wait_for_idle(120)
            run = spawn(tool, data_dir, repeat)
            runs.append(run)
            if "error" not in run:
                print(
                    f"  {tool:15s} {run['tokens_per_second']:7.0f} tok/s  {run['peak_rss_mb']:6.0f} MB  "
                    f"loss {run['train_loss']:.4f}  foreign load {run['foreign_load']:.2f}",
                    flush=True,
                )
    report = summarize(runs, meta, tools, peak)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"sft-{stamp}.json").write_text(
        json.dumps({"meta": meta, "peak_gflops": peak, "runs": runs, "summary": report}, indent=2)
    )
    (RESULTS / f"sft-{stamp}.md").write_text(report["markdown"])
    print(report["markdown"])
    return 0


def summarize(
    runs: list[dict[str, Any]], meta: dict[str, Any], tools: list[str], peak: dict[str, float]
) -> dict[str, Any]:
    medians: dict[str, dict[str, float]] = {}
    for tool in tools:
        ok = [r for r in runs if r["tool"] == tool and "error" not in r]
        if ok:
            medians[tool] = {
                k: statistics.median(r[k] for r in ok) for k in ("tokens_per_second", "peak_rss_mb", "train_loss")
            }
            medians[tool]["train_seconds"] = statistics.median(r["train_seconds"] for r in ok)
            precision = ok[0]["precision"]
            medians[tool]["mfu"] = useful_flops(meta) / medians[tool]["train_seconds"] / 1e9 / peak[precision]
    lines = ["| tool | tokens/s | peak memory (MB) | mean train loss | MFU |", "|---|---|---|---|---|"]
    for tool, m in medians.items():
        cells = [f"{m['tokens_per_second']:.0f}", f"{m['peak_rss_mb']:.0f}", f"{m['train_loss']:.4f}"]
        cells.append(f"{m['mfu']:.0%}")
        lines.append(f"| {tool} | " + " | ".join(cells) + " |")
    ratio_lines = []
    if "tunesmith" in medians:
        t = medians["tunesmith"]
        for ref in (k for k in medians if k.startswith("reference")):
            r = medians[ref]
            ratio_lines.append(
                f"vs {ref}: throughput {t['tokens_per_second'] / r['tokens_per_second']:.2f}x, "
                f"peak memory {t['peak_rss_mb'] / r['peak_rss_mb']:.2f}x, "
                f"train loss {100 * (t['train_loss'] / r['train_loss'] - 1):+.1f}%"
            )
    peak_line = (
        f"MFU against the matmul peak measured in this run: {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} bf16."
    )
    return {"medians": medians, "markdown": "\n".join([*lines, "", *ratio_lines, "", peak_line]) + "\n"}


if __name__ == "__main__":
    raise SystemExit(main())
