"""Benchmark: one run in 1 process against the same run in 2 (`tunesmith train --nproc 2`).

MiniLM (the packaged all-MiniLM-L6-v2) fine-tuned in full on the packaged Rotten Tomatoes reviews
(the rows of bench/classification.py: de-duplicated, sorted by hash; 1,500 to train, 500 held
out), 1 epoch, max length 128, lr 5e-5, the same global batch of 32 rows: one process with
batch 16 x grad_accum 2, or two processes with batch 16 each (DDP, gloo). Everything else at its
default (precision `auto`).

Measured per run, each a fresh `tunesmith train` command, alternating 1 and 2 processes over the
repeats (medians reported):
- throughput: training samples/s as the run reports it (rank 0's training time, evaluation and
  checkpoint writes left out);
- wall time of the whole command (imports, loading and the launcher included);
- peak memory: the largest sum of the resident memory of the command and all its processes,
  sampled every 0.1 s;
- the last logged training loss and the held-out accuracy.

On a 2-core machine, two processes get one core each (OMP_NUM_THREADS=1) where one process gets
both: data parallelism cannot beat one process's two-thread matmuls by much there, and it holds the
model twice. It pays where there are more cores than one process uses well, or several machines.

Run: `python bench/distributed.py [--repeats 2] [--rows 1500]`; prints a Markdown table and writes
bench/results/distributed-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

from classification import prepare_data

ROOT = Path(__file__).resolve().parents[1]


def cpu() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name")), "")
    return f"{model}; BF16 (avx512_bf16): {'yes' if 'avx512_bf16' in info else 'no'}"


def config(data: Any, out: Path, nproc: int) -> dict[str, Any]:
    return {
        "task": "classification",
        "model": "minilm-l6",
        "method": "full",
        "data": {"train": str(data.train), "validation": str(data.test), "max_length": 128},
        "train": {"epochs": 1, "lr": 5e-5, "batch_size": 16, "grad_accum": 2 // nproc, "log_every": 5},
        "output": {"dir": str(out), "name": f"nproc{nproc}"},
    }


def tree_rss_mb(root: psutil.Process) -> float:
    total = 0
    for p in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def run(data: Any, work: Path, nproc: int, repeat: int) -> dict[str, Any]:
    out = work / f"runs-{nproc}-{repeat}"
    path = work / f"nproc{nproc}.yaml"
    path.write_text(yaml.safe_dump(config(data, out, nproc)))
    command = [sys.executable, "-m", "tunesmith", "train", str(path), "--nproc", str(nproc)]
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0.0]
    watcher = psutil.Process(proc.pid)

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mb(watcher))
            time.sleep(0.1)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"nproc {nproc} failed:\n{err[-3000:]}")
    (run_dir,) = out.iterdir()
    metrics = json.loads((run_dir / "eval.json").read_text())
    losses = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r["loss"] for r in losses if r.get("kind") == "train"][-1]
    return {
        "nproc": nproc,
        "repeat": repeat,
        "samples_per_second": metrics["train"]["samples_per_second"],
        "wall_seconds": wall,
        "peak_memory_mb": peak[0],
        "final_train_loss": last_loss,
        "accuracy": metrics["validation"]["accuracy"],
        "precision": metrics["train"]["precision"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1500)
    args = parser.parse_args()
    print(f"CPU: {cpu()}; {psutil.cpu_count(logical=False)} cores")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = prepare_data(work, args.rows, 500)
        for repeat in range(args.repeats):
            for nproc in (1, 2) if repeat % 2 == 0 else (2, 1):
                results.append(run(data, work, nproc, repeat))
                print(json.dumps(results[-1]))
    keys = ["samples_per_second", "wall_seconds", "peak_memory_mb", "final_train_loss", "accuracy"]
    medians = {n: {k: statistics.median(r[k] for r in results if r["nproc"] == n) for k in keys} for n in (1, 2)}
    lines = [
        f"CPU: {cpu()}; precision {results[0]['precision']}; medians of {args.repeats}",
        "",
        "| processes | samples/s | wall s | peak memory (all processes) | final train loss | held-out accuracy |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n, m in medians.items():
        lines.append(
            f"| {n} | {m['samples_per_second']:.1f} | {m['wall_seconds']:.0f} | {m['peak_memory_mb'] / 1024:.2f} GB "
            f"| {m['final_train_loss']:.4f} | {m['accuracy']:.4f} |"
        )
    print("\n".join(lines))
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (results_dir / f"distributed-{stamp}.json").write_text(json.dumps({"runs": results, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
