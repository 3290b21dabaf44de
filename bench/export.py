"""Exports of four packaged models, measured: size on disk, load time, latency per row, parity.

Trains four short runs on the packaged models and data (the shipped configs, shortened), then exports
each to every format that fits it and tabulates what `tunesmith export` measured:
- MiniLM, LoRA, text classification (configs/classify-lora.yaml, 1,000 reviews, 1 epoch): hf, peft,
  onnx, onnx int8;
- SmolLM2-135M-Instruct, LoRA, SFT (configs/sft-lora.yaml, 40 steps): hf, peft, onnx, gguf f16,
  q8_0 and q4_0;
- EfficientNet-Lite0, full, MNIST (configs/image-full.yaml, 1,000 images, 1 epoch): hf, onnx, onnx int8;
- Whisper tiny.en, LoRA, keyword spotting (configs/speech-lora.yaml, 1 epoch): hf, peft, onnx, onnx int8.

Parity is measured on `--rows` held-out rows of each run (default 64): the largest logit difference
against the trained model, the share of rows (positions, for a causal LM) with the same argmax, and
for the causal LM whether greedy generations are identical. Load time is the format's own library
loading the artifact; latency the median time of the probe batch through it, per row, on this CPU.
A format that fails its parity check is listed with the error.

Run: `python bench/export.py [--rows 64] [--out DIR]`; the table goes to
bench/results/export-<timestamp>.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import tunesmith
from tunesmith.errors import TunesmithError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
RUNS: tuple[tuple[str, str, list[str], tuple[tuple[str, str | None], ...]], ...] = (
    (
        "MiniLM, LoRA, classification",
        "classify-lora.yaml",
        ["data.limit=1000", "train.epochs=1", "eval.baseline=false"],
        (("hf", None), ("peft", None), ("onnx", None), ("onnx", "int8")),
    ),
    (
        "SmolLM2-135M, LoRA, SFT",
        "sft-lora.yaml",
        ["train.max_steps=40", "eval.baseline=false", "eval.exact_match_rows=16", "eval.samples=0"],
        (("hf", None), ("peft", None), ("onnx", None), ("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_0")),
    ),
    (
        "EfficientNet-Lite0, full, MNIST",
        "image-full.yaml",
        ["data.limit=1000", "train.epochs=1"],
        (("hf", None), ("onnx", None), ("onnx", "int8")),
    ),
    (
        "Whisper tiny.en, LoRA, keyword spotting",
        "speech-lora.yaml",
        ["train.epochs=1", "eval.baseline=false"],
        (("hf", None), ("peft", None), ("onnx", None), ("onnx", "int8")),
    ),
)


def cpu() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name")), "")
    return f"{model}; BF16 (avx512_bf16): {'yes' if 'avx512_bf16' in info else 'no'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="Held-out rows to check parity on.")
    parser.add_argument("--out", type=Path, default=None, help="Where runs and exports go (default: a temp dir).")
    parser.add_argument("--render", type=Path, help="Only print the table of an earlier results .json.")
    args = parser.parse_args()
    if args.render:
        print(render(_with_formats(json.loads(args.render.read_text())["rows"]), args.rows))
        return
    work = args.out or Path(tempfile.mkdtemp(prefix="tunesmith-export-bench-"))
    rows: list[dict[str, Any]] = []
    print(f"CPU: {cpu()}")
    for label, config, overrides, formats in RUNS:
        print(f"training {label} ...", flush=True)
        started = time.perf_counter()
        result = tunesmith.train(CONFIGS / config, overrides=[*overrides, f"output.dir={work / 'runs'}"])
        print(f"  {time.perf_counter() - started:.0f} s", flush=True)
        for fmt, quantize in formats:
            name = f"{fmt}-{quantize}" if quantize else fmt
            target = work / "exports" / f"{result.run_dir.name}-{name}"
            shutil.rmtree(target, ignore_errors=True)
            row: dict[str, Any] = {"model": label, "format": name}
            try:
                done = tunesmith.export(result.run_dir, fmt, target, quantize=quantize, rows=args.rows)
            except TunesmithError as exc:
                row["error"] = str(exc)
                print(f"  {name}: {exc}", flush=True)
            else:
                row |= done.to_dict() | {"format": name}
                print(f"  {name}: {done.parity.describe()}", flush=True)
            rows.append(row)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"export-{stamp}.json").write_text(json.dumps({"cpu": cpu(), "rows": rows}, indent=2) + "\n")
    table = render(rows, args.rows)
    (results / f"export-{stamp}.md").write_text(f"CPU: {cpu()}\n\n{table}")
    print(table)


def _with_formats(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of results written before the format column named the quantization."""
    return [
        r | {"format": f"{r['format']}-{r['quantize']}"} if r.get("quantize") and "-" not in r["format"] else r
        for r in rows
    ]


def render(rows: list[dict[str, Any]], probe_rows: int) -> str:
    lines = [
        f"| model | format | size (MB) | load (s) | ms per row | max logit diff "
        f"| same argmax ({probe_rows} rows: decided; all) | generations | metric change |",
        "|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['model']} | {row['format']} | — | — | — | — | — | — | refused: {row['error']} |")
            continue
        parity = row["parity"]
        same = parity["greedy_generations_identical"]
        change = row.get("held_out_change")
        if isinstance(change, dict):  # quantized: the task's metrics on held-out rows, against fp32
            change = ", ".join(f"{k} {v:+.3f}" for k, v in change.items() if k in ("accuracy", "macro_f1"))
        else:
            change = "none (same argmax)" if parity["same_argmax"] == 1.0 else "see parity"
        lines.append(
            f"| {row['model']} | {row['format']} | {row['size_bytes'] / 1e6:.1f} | {row['load_seconds']:.2f} "
            f"| {row['latency_ms_per_row']:.2f} | {parity['max_abs_logit_diff']:.2g} "
            f"| {parity['same_argmax']:.1%}; {parity.get('same_argmax_all', parity['same_argmax']):.1%} "
            f"| {'—' if same is None else 'identical' if same else 'differ'} | {change} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
