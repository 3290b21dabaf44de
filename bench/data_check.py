"""Benchmark: `tunesmith data check` and `data clean` streaming a million short review-like rows.

Data (written once per workload as JSONL to a temp dir, not timed): reviews of 12-24 words (the
long workload: 120-240) drawn with Zipf-like frequencies from a 5,000-word synthetic vocabulary,
labelled positive/negative, with injected problems: 2% exact duplicates of an earlier row (half of
them upper-cased), 1% near duplicates (one word changed), 0.1% the text of an earlier row with the
other label, 0.1% empty texts and 0.05% malformed JSON lines. A validation file of 1,000 rows, 10
of them copies of training rows (leakage).

Measurement: every (workload, phase) runs in a fresh `python bench/data_check.py --worker ...`
process, so peak memory is that phase's alone. `check` = `check_file(train, references=[validation])`
(one streamed pass over train, then over validation); `clean` = `clean_file` (the same, then a second
pass that writes the kept rows and the dropped rows with their reasons). No tokenizer: lengths are
whitespace words, as `tunesmith data check FILE` without --config. Wall time is around the call
only (imports and data generation excluded); rows/s = training rows / wall time. Peak memory is
`ru_maxrss` of the worker; `baseline_rss_mb` is its RSS after imports, before any row is read, so
(peak - baseline) / rows is the memory a row costs. The machine's 1-minute load average before and
after each phase is recorded: other processes on the same 2 cores slow the run down.

Workloads: `1m-short` (the headline: 1,000,000 rows), `100k-short` and `100k-long` (the same rows
count with 10x longer texts: memory per row should not grow with the text).

Run: `python bench/data_check.py [--workloads 1m-short,100k-short,100k-long]`; results go to
bench/results/data_check-<timestamp>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOADS = {"1m-short": (1_000_000, 12, 24), "100k-short": (100_000, 12, 24), "100k-long": (100_000, 120, 240)}
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "zu", "pe", "da", "go", "hi", "ba", "fe", "jo"]


def vocabulary(size: int, rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4))))
    return sorted(words)


def generate(directory: Path, rows: int, low: int, high: int, seed: int = 0) -> dict[str, Any]:
    """Write train.jsonl and validation.jsonl; return how many of each problem were injected."""
    rng = random.Random(seed)
    vocab = vocabulary(5000, rng)
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    recent: list[tuple[str, str]] = []  # earlier rows to copy from
    injected = {"duplicates": 0, "near_duplicates": 0, "conflicting": 0, "empty": 0, "malformed": 0}
    with (directory / "train.jsonl").open("w") as fh:
        for i in range(rows):
            roll = rng.random()
            if recent and roll < 0.02:
                text, label = rng.choice(recent)
                text = text.upper() if rng.random() < 0.5 else text
                injected["duplicates"] += 1
            elif recent and roll < 0.03:
                text, label = rng.choice(recent)
                words = text.split()
                words[rng.randrange(len(words))] = "changed"
                text = " ".join(words)
                injected["near_duplicates"] += 1
            elif recent and roll < 0.031:
                text, label = rng.choice(recent)
                label = "negative" if label == "positive" else "positive"
                injected["conflicting"] += 1
            elif roll < 0.032:
                text, label = "   ", "positive"
                injected["empty"] += 1
            elif roll < 0.0325:
                fh.write('{"text": "broken", "label": \n')
                injected["malformed"] += 1
                continue
            else:
                text = " ".join(rng.choices(vocab, weights, k=rng.randint(low, high))) + f" r{i}"
                label = "positive" if rng.random() < 0.5 else "negative"
                if len(recent) < 10_000:
                    recent.append((text, label))
                else:
                    recent[rng.randrange(len(recent))] = (text, label)
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    with (directory / "validation.jsonl").open("w") as fh:
        for i in range(1000):
            if i < 10:
                text, label = recent[i]
            else:
                text = " ".join(rng.choices(vocab, weights, k=rng.randint(low, high))) + f" v{i}"
                label = "positive" if rng.random() < 0.5 else "negative"
            fh.write(json.dumps({"text": text, "label": label}) + "\n")
    injected["leakage"] = 10
    return injected


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def worker(phase: str, directory: Path) -> dict[str, Any]:
    """One phase in this (fresh) process: timings, memory, and what was found."""
    from tunesmith.config import DataConfig
    from tunesmith.data.quality import check_file, clean_file

    train, validation = directory / "train.jsonl", directory / "validation.jsonl"
    cfg = DataConfig(train=str(train), max_length=128)
    baseline = rss_mb()
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    if phase == "check":
        report = check_file(train, cfg, "classification", references=[validation])
    else:
        report = clean_file(train, directory / "clean.jsonl", cfg, "classification", references=[validation])
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "phase": phase,
        "rows": report.rows,
        "seconds": seconds,
        "rows_per_second": report.rows / seconds,
        "baseline_rss_mb": baseline,
        "peak_rss_mb": peak,
        "bytes_per_row": (peak - baseline) * 2**20 / report.rows,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "found": {f.name: f.count for f in report.findings},
        "cleaned": report.cleaned.to_dict() if report.cleaned else None,
    }


def run_workload(name: str) -> list[dict[str, Any]]:
    rows, low, high = WORKLOADS[name]
    results = []
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        directory = Path(tmp)
        start = time.perf_counter()
        injected = generate(directory, rows, low, high)
        size_mb = (directory / "train.jsonl").stat().st_size / 2**20
        print(f"{name}: {rows:,} rows, {size_mb:.0f} MB written in {time.perf_counter() - start:.0f}s", flush=True)
        for phase in ("check", "clean"):
            command = [sys.executable, __file__, "--worker", phase, str(directory)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = {"workload": name, "file_mb": size_mb, "injected": injected, **json.loads(out)}
            print(
                f"  {phase}: {result['seconds']:.1f}s, {result['rows_per_second']:,.0f} rows/s, peak RSS "
                f"{result['peak_rss_mb']:.0f} MB (baseline {result['baseline_rss_mb']:.0f} MB, "
                f"{result['bytes_per_row']:.0f} B/row), load {result['load_before']:.1f}",
                flush=True,
            )
            results.append(result)
    return results


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| workload | phase | rows | file MB | wall s | rows/s | peak RSS MB | baseline MB | bytes/row | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['workload']} | {r['phase']} | {r['rows']:,} | {r['file_mb']:.0f} | {r['seconds']:.1f} | "
            f"{r['rows_per_second']:,.0f} | {r['peak_rss_mb']:.0f} | {r['baseline_rss_mb']:.0f} | "
            f"{r['bytes_per_row']:.0f} | {r['load_before']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="1m-short,100k-short,100k-long")
    parser.add_argument("--worker", nargs=2, metavar=("PHASE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker[0], Path(args.worker[1]))))
        return 0
    results = [r for name in args.workloads.split(",") for r in run_workload(name)]
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"data_check-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"data_check-{stamp}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
