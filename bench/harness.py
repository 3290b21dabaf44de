"""The measurement harness shared by the benchmarks against a reference: bench/classification.py and
bench/vision.py use all of it, bench/sft.py the measurement of its workers.

Every (tool, variant, workload, repeat) runs in a fresh `python bench/<name>.py --worker ...`
subprocess, so peak memory is per run. Within a repeat the tools alternate (reference fp32,
tunesmith, reference bf16; the order rotates each repeat) to spread machine noise; the report gives
medians over repeats. Before each run the harness waits (`--wait-idle`) for other processes to leave
the CPU, and records how many cores they used while the run went on (`foreign_load`: the machine's
busy time from /proc/stat minus the worker's own CPU time, over the worker's wall time); runs above
0.2 cores are flagged, since two cores shared with anything else give meaningless timings. Peak
memory is `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the worker (KiB on Linux -> MB).

What each benchmark trains, how it counts FLOPs and which columns its tables have stay in its own
script; this module holds the parts that are the same. The scripts import it as `harness`: run as
`python bench/<name>.py`, their directory is on the import path, for the workers too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

NOISY_LOAD = 0.2  # cores used by other processes during a run, above which its timing is suspect
RESULTS_DIR = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


@dataclass(frozen=True)
class Workload:
    """One training setting of a benchmark: its name, epochs, learning rate and a line for the tables."""

    name: str
    epochs: int
    lr: float
    description: str


@dataclass(frozen=True)
class Tool:
    """One side of the comparison: `reference` at a precision, or `tunesmith`."""

    name: str
    variant: str  # fp32 | bf16 | default

    @property
    def label(self) -> str:
        """The name in results and tables: `tunesmith`, `reference-fp32`, `reference-bf16`."""
        return self.name if self.variant == "default" else f"{self.name}-{self.variant}"


TOOLS = {
    "reference-fp32": [Tool("reference", "fp32")],
    "tunesmith": [Tool("tunesmith", "default")],
    "reference-bf16": [Tool("reference", "bf16")],
}
TOOLS["reference"] = TOOLS["reference-fp32"] + TOOLS["reference-bf16"]


@dataclass(frozen=True)
class DataPaths:
    """The files one benchmark shares between its workers, all in one temp dir."""

    dir: Path
    suffix: str  # of the train and held-out files: .jsonl | .npz

    @property
    def train(self) -> Path:
        """The training set."""
        return self.dir / f"train{self.suffix}"

    @property
    def test(self) -> Path:
        """The held-out set."""
        return self.dir / f"heldout{self.suffix}"

    @property
    def meta(self) -> Path:
        """Sizes and counts of the data, as JSON."""
        return self.dir / "meta.json"

    def read_meta(self) -> dict[str, Any]:
        """The meta file's contents (sizes and whatever the benchmark counted while preparing the data)."""
        return json.loads(self.meta.read_text(encoding="utf-8"))


# --- inside a worker: one run in its own process -----------------------------------------------


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MB, from ru_maxrss."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def own_cpu_seconds() -> float:
    """CPU seconds (user + system) this process has used."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def write_worker_result(
    out: Path,
    result: dict[str, Any],
    tool: Tool,
    workload: Workload,
    start: float,
    rates: dict[str, float],
    extra: dict[str, Any] | None = None,
) -> None:
    """Add the run's names, wall time since `start`, `rates`, peak RSS, own CPU time and `extra`; write it as JSON."""
    result.update(tool=tool.label, workload=workload.name, wall_seconds=time.perf_counter() - start)
    result.update(rates, peak_rss_mb=peak_rss_mb(), cpu_seconds=own_cpu_seconds(), **(extra or {}))
    out.write_text(json.dumps(result), encoding="utf-8")


def run_as_worker(
    args: argparse.Namespace,
    workloads: dict[str, Workload],
    suffix: str,
    run_worker: Callable[[Tool, Workload, DataPaths, Path], None],
) -> int:
    """In a `--worker` process: run the one configuration its hidden options name; returns the exit status."""
    (tool,) = selected_tools(args.tool)
    (workload,) = selected_workloads(args.workloads, workloads)
    run_worker(tool, workload, DataPaths(args.data_dir, suffix), args.out)
    return 0


# --- the parent: one fresh process per run -----------------------------------------------------


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, every process), from /proc/stat."""
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return (sum(ticks) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_seconds: float, threshold: float = 0.25) -> float:
    """Wait (up to `max_seconds`) until other processes use < `threshold` cores; returns the wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_seconds:
        before = machine_busy_seconds()
        time.sleep(2.0)
        if (machine_busy_seconds() - before) / 2.0 < threshold:
            break
    return time.perf_counter() - start


def worker_env(**extra: str) -> dict[str, str]:
    """This process's environment with the Hugging Face hub offline, plus `extra`."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra}


def run_measured(
    cmd: list[str], env: dict[str, str], out: Path, repeat: int
) -> tuple[subprocess.CompletedProcess[str], dict[str, Any] | None]:
    """Run a worker command; its JSON result from `out` with `repeat` and `foreign_load`, or None if it failed."""
    busy, start = machine_busy_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    busy, wall = machine_busy_seconds() - busy, time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        return proc, None
    result = json.loads(out.read_text(encoding="utf-8"))
    result.update(repeat=repeat, foreign_load=(busy - result["cpu_seconds"]) / wall)
    return proc, result


def spawn_worker(
    script: Path,
    env: dict[str, str],
    tool: Tool,
    workload: Workload,
    data_dir: Path,
    repeat: int,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run one configuration of `script` in a fresh subprocess (with `seed` in place of the
    benchmark's own, where given); a failure is recorded, never hidden."""
    out = data_dir / f"{tool.label}-{workload.name}-{repeat}.json"
    cmd = [sys.executable, str(script), "--worker", "--tool", tool.label]
    cmd += ["--workloads", workload.name, "--data-dir", str(data_dir), "--out", str(out)]
    cmd += ["--seed", str(seed)] if seed is not None else []
    proc, result = run_measured(cmd, env, out, repeat)
    if result is not None and seed is not None:
        result["seed"] = seed
    if result is None:
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"  FAILED {tool.label} {workload.name} (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"tool": tool.label, "workload": workload.name, "repeat": repeat, "error": tail}
    return result


def rotated(items: Sequence[T], repeat: int) -> list[T]:
    """`items` rotated left by `repeat`, so that each repeat starts with another tool."""
    return [*items[repeat % len(items) :], *items[: repeat % len(items)]]


def run_all(
    script: Path,
    env: dict[str, str],
    tools: list[Tool],
    workloads: list[Workload],
    data_dir: Path,
    repeats: int,
    wait_idle: float,
    print_run: Callable[[dict[str, Any]], None],
    first_seed: int | None = None,
) -> list[dict[str, Any]]:
    """Every run in its own process; tools alternate within a repeat, their order rotating. With
    `first_seed`, repeat r of every tool trains with seed `first_seed + r` (the spread over seeds)."""
    runs = []
    for repeat in range(repeats):
        order = rotated(tools, repeat)
        for workload in workloads:
            for tool in order:
                print(f"repeat {repeat + 1}/{repeats}  {workload.name:<18} {tool.label} ...", flush=True)
                waited = wait_for_idle(wait_idle)
                seed = None if first_seed is None else first_seed + repeat
                run = spawn_worker(script, env, tool, workload, data_dir, repeat, seed)
                run["waited_for_idle_seconds"] = waited
                runs.append(run)
                if "error" not in run:
                    print_run(run)
    return runs


# --- selection and options ---------------------------------------------------------------------


def selected_tools(spec: str) -> list[Tool]:
    """The tools named in a comma-separated `spec`, in the order reference fp32, tunesmith, reference bf16."""
    chosen: list[Tool] = []
    for name in spec.split(","):
        if name not in TOOLS:
            raise SystemExit(f"unknown tool {name!r}; choose from {', '.join(TOOLS)}")
        chosen += [t for t in TOOLS[name] if t not in chosen]
    order = [t for ts in (TOOLS["reference-fp32"], TOOLS["tunesmith"], TOOLS["reference-bf16"]) for t in ts]
    return [t for t in order if t in chosen]


def selected_workloads(spec: str, workloads: dict[str, Workload]) -> list[Workload]:
    """The workloads named in a comma-separated `spec`, in its order."""
    unknown = [n for n in spec.split(",") if n not in workloads]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(workloads)}")
    return [workloads[n] for n in spec.split(",")]


def parse_args(
    argv: list[str] | None,
    description: str,
    workloads: dict[str, Workload],
    sizes: tuple[int, int],
    quick: tuple[int, int],
    unit: str,
    own_options: Callable[[argparse.ArgumentParser], object] | None = None,
) -> argparse.Namespace:
    """The options every benchmark has, `own_options` among them; --quick: `quick` train / held-out `unit`, 1 repeat."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=3, help="Repeats per configuration (median).")
    parser.add_argument("--workloads", default=",".join(workloads), help="Comma-separated workloads.")
    parser.add_argument("--tools", default="reference,tunesmith", help=f"Comma-separated of {', '.join(TOOLS)}.")
    if own_options is not None:
        own_options(parser)
    parser.add_argument("--train-size", type=int, default=sizes[0])
    parser.add_argument("--test-size", type=int, default=sizes[1])
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=300.0,
        help="Before each run, wait up to this many seconds for other processes to leave the CPU.",
    )
    parser.add_argument("--peak-gflops-fp32", type=float, help="For the MFU (default: measured, `matmul_peak`).")
    parser.add_argument("--peak-gflops-bf16", type=float, help="For the MFU (default: measured, `matmul_peak`).")
    parser.add_argument("--quick", action="store_true", help=f"Smoke test: {quick[0]} / {quick[1]} {unit}, 1 repeat.")
    parser.add_argument(
        "--seeds",
        action="store_true",
        help="Repeat r trains with seed 42 + r on every side (else all use 42): accuracy's spread over seeds.",
    )
    parser.add_argument("--seed", type=int, help=argparse.SUPPRESS)  # a worker's seed
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.repeats = quick[0], quick[1], 1
    return args


def peaks(args: argparse.Namespace) -> dict[str, float]:
    """The peaks (GFLOP/s) of the MFU estimate: --peak-gflops-* where given, else measured on this
    machine in this run (`matmul_peak`, once)."""
    measured = getattr(args, "_measured_peak", None)
    if measured is None and (args.peak_gflops_fp32 is None or args.peak_gflops_bf16 is None):
        measured = args._measured_peak = matmul_peak()
    return {
        "fp32": args.peak_gflops_fp32 or measured["fp32"],
        "bf16": args.peak_gflops_bf16 or measured["bf16"],
    }


def matmul_peak() -> dict[str, float]:
    """The machine's matmul peak (GFLOP/s) at fp32 and bf16: a 2048² matmul, median of 7 after one
    warm-up, with every thread torch uses. MFU figures are against this."""
    import torch

    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        a @ b
        times = []
        for _ in range(7):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        peak[name] = 2 * 2048**3 / statistics.median(times) / 1e9
    return peak


# --- the summary -------------------------------------------------------------------------------


def summarize(
    runs: list[dict[str, Any]],
    workloads: dict[str, Workload],
    metrics: tuple[str, ...],
    train_flops: Callable[[Workload, Tool], float],
    peaks: dict[str, float],
    throughput: str,
    joined: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Medians of `metrics` per (workload, tool) (distinct values of the `joined` keys: "a/b"), then the ratios."""
    tools = {t.label: t for name in ("reference-fp32", "reference-bf16", "tunesmith") for t in TOOLS[name]}
    summary: dict[str, Any] = {}
    for run in runs:  # each successful run gets its estimated `mfu` added in place (saved with the runs)
        if "error" not in run:
            flops = train_flops(workloads[run["workload"]], tools[run["tool"]])
            run["mfu"] = flops / run["train_seconds"] / (peaks[run["precision"]] * 1e9)
    for name in workloads:
        medians: dict[str, dict[str, Any]] = {}
        for label in tools:
            done = [r for r in runs if r["workload"] == name and r["tool"] == label and "error" not in r]
            if done:
                medians[label] = {m: statistics.median(r[m] for r in done) for m in metrics}
                for key in joined:
                    medians[label][key] = "/".join(sorted({r[key] for r in done}))
                medians[label]["runs"] = len(done)
                if "accuracy" in metrics:
                    accuracies = [r["accuracy"] for r in done]
                    medians[label]["accuracy_range"] = [min(accuracies), max(accuracies)]
                    medians[label]["seeds"] = sorted({r["seed"] for r in done if "seed" in r})
        if medians:
            summary[name] = {"medians": medians, "ratios": ratios(medians, throughput)}
    return summary


def ratios(medians: dict[str, dict[str, Any]], throughput: str) -> dict[str, dict[str, float]]:
    """tunesmith's throughput, peak memory and accuracy against each reference variant."""
    ts = medians.get("tunesmith")
    out: dict[str, dict[str, float]] = {}
    for ref in ("reference-fp32", "reference-bf16"):
        if ts and ref in medians:
            base = medians[ref]
            out[ref] = {
                "throughput": ts[throughput] / base[throughput],
                "memory": ts["peak_rss_mb"] / base["peak_rss_mb"],
                "accuracy_points": 100 * (ts["accuracy"] - base["accuracy"]),
            }
    return out


def markdown(
    summary: dict[str, Any],
    runs: list[dict[str, Any]],
    header: list[str],
    workloads: dict[str, Workload],
    columns: list[str],
    row: Callable[[str, dict[str, Any]], str],
) -> str:
    """README-ready tables: one per workload (`columns` lines, then a `row` per tool), then tunesmith's ratios."""
    noisy = [r for r in runs if r.get("foreign_load", 0.0) > NOISY_LOAD]
    failed = [r for r in runs if "error" in r]
    lines = list(header)
    for name, part in summary.items():
        w = workloads[name]
        lines += ["", f"### {name}: {w.description}, {w.epochs} epoch(s), lr {w.lr:g}", ""]
        lines += columns
        for label, m in part["medians"].items():
            lines.append(row(label, m))
        if part["ratios"]:
            lines += ["", "| tunesmith vs | throughput (×) | peak memory (×) | accuracy (Δ points) |"]
            lines += ["|---|---:|---:|---:|"]
            for ref, r in part["ratios"].items():
                lines.append(f"| {ref} | {r['throughput']:.2f} | {r['memory']:.2f} | {r['accuracy_points']:+.1f} |")
        seeded = {label: m for label, m in part["medians"].items() if len(m.get("seeds", [])) > 1}
        if seeded:
            spread = "; ".join(
                f"{label} {m['accuracy_range'][0]:.3f}–{m['accuracy_range'][1]:.3f}" for label, m in seeded.items()
            )
            seeds = next(iter(seeded.values()))["seeds"]
            lines += ["", f"Accuracy over seeds {', '.join(map(str, seeds))} (lowest–highest): {spread}."]
    if noisy:
        lines += ["", f"Warning: {len(noisy)} run(s) shared the CPU with other processes (> {NOISY_LOAD} cores)."]
    if failed:
        lines += ["", f"Failed: {', '.join(sorted({r['tool'] + '/' + r['workload'] for r in failed}))}."]
    return "\n".join(lines)


# --- environment and the record ----------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    """The CPU's model name (lscpu's "Model name"), whether it has BF16 instructions (the
    avx512_bf16 or amx_bf16 flag) and AMX tiles (amx_bf16: a bf16 matmul several times the fp32
    one; Xeons of the same model name differ in it) and its core count: what every benchmark prints
    with its table."""
    from tunesmith.machine import cpu_name

    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    bf16, amx = "avx512_bf16" in flags or "amx_bf16" in flags, "amx_bf16" in flags
    return {"cpu": cpu_name(), "bf16": bf16, "amx": amx, "cores": os.cpu_count()}


def environment(matmul_gflops: Callable[[str], float], versions: dict[str, str] | None = None) -> dict[str, Any]:
    """The machine and library versions, with the matmul rate `matmul_gflops` measures at fp32 and bf16."""
    import torch
    import transformers

    return {
        "matmul_gflops": {name: matmul_gflops(name) for name in ("fp32", "bf16")},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **(versions or {}),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16": torch.cpu._is_avx512_bf16_supported(),
        "machine": platform.platform(),
    }


def write_record(
    path: Path,
    args: argparse.Namespace,
    env: dict[str, Any],
    meta: dict[str, Any],
    runs: list[dict[str, Any]],
    summary: dict[str, Any],
    table: str,
) -> None:
    """Write the JSON record of a benchmark (arguments, environment, data, runs, summary, table) to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": env, "data": meta}
    record.update(runs=runs, summary=summary, markdown=table)
    path.write_text(json.dumps(record, indent=2), encoding="utf-8")
