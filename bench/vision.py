"""Benchmark: tunesmith against a plain PyTorch training loop on image classification.

Both sides fine-tune the packaged EfficientNet-Lite0 (ImageNet weights, tunesmith's own module
`tunesmith.models.efficientnet`, a new 10-way head) on the packaged MNIST 5k digits at
`--size` x `--size` pixels (default 64), with the same data, seed and hyperparameters, for two
workloads: `feature-extraction` (frozen backbone with its batch norms in eval mode, only the head
trains, 5 epochs, lr 2e-3) and `full` (every weight, 1 epoch, lr 5e-4). Shared: batch 32, AdamW
with weight decay 0.01, linear schedule with warmup ratio 0.06 (warmup steps rounded as tunesmith
does), max grad norm 1.0, head dropout 0.1 (tunesmith's `model.head_dropout`), seed 42, no
augmentation.

Data. The 5,000 digits (no two share their pixels) are sorted by the SHA-1 of their pixel bytes
and cut into 4,000 training and the next 1,000 held-out images (disjoint, deterministic,
independent of file order; ten balanced classes). They are written as `.npz` files (`images`
(N, 28, 28) uint8, `labels` (N,) int) to a temp dir; tunesmith reads them as image data and gets
the held-out file as `data.validation`, the reference decodes the same files.

Preprocessing is the same on both sides, bit for bit: the reference calls tunesmith's
`eval_transform` with the `Preprocessing` tunesmith builds for this model (shorter side resized to
round(S * 256 / 224) bilinear with PIL, centre crop S, (x - 127) / 128, grayscale repeated to three
channels), decoding in a torch `DataLoader` (num_workers 0, shuffled each epoch) into ordinary
contiguous NCHW batches.

The reference is the loop a practitioner writes by hand: `load_efficientnet_lite0(num_classes=10,
seed=42)` (the ImageNet head replaced by a seeded new one), `AdamW(trainable params, lr,
weight_decay=0.01)`, `get_linear_schedule_with_warmup`, cross-entropy, `clip_grad_norm_(1.0)`.
Feature extraction freezes everything but `net.classifier`, keeps the backbone in eval mode (the
dropout before the head still drops) and runs the whole network on every batch of every epoch (no
caching). Full trains everything in `net.train()`. Two precisions: fp32 and bf16
(`torch.autocast("cpu", dtype=torch.bfloat16)` around forward and loss). tunesmith runs at its
default precision (`train.precision: auto`: fp32 for a conv net on CPU, channels-last memory),
recorded from `metrics["train"]["precision"]`. Both heads are a seeded `nn.Linear` with torch's
default init (the same scheme, not the same draw). A difference that remains: tunesmith does not
decay biases and norm weights.

Method of measurement (as bench/classification.py). Every (tool, variant, workload, repeat) runs in
a fresh `python bench/vision.py --worker ...` subprocess, so peak memory is per run. Within a
repeat the tools alternate (reference fp32, tunesmith, reference bf16; the order rotates each
repeat) to spread machine noise; the report gives medians over repeats. Before each run the harness
waits (`--wait-idle`) for other processes to leave the CPU, and records how many cores they used
while the run went on (`foreign_load`, from /proc/stat minus the worker's own CPU time); runs above
0.2 cores are flagged.

- Training time: wall time of the reference's training loop (decoding included), or tunesmith's
  own `metrics["train"]["train_seconds"]` (which includes decoding and its one-off caching of the
  frozen features, of the held-out images too since they are its validation set, and leaves out
  its per-epoch validation and checkpoint writes). Model loading and the final evaluation are
  outside both; `wall_seconds` (the whole worker) is kept too.
- Throughput: images/s = epochs * n_train / seconds, the same formula for both; tunesmith's
  self-reported `samples_per_second` is kept as well.
- Accuracy: argmax over the 1,000 held-out digits after training (eval mode, same autocast as
  training; tunesmith's `metrics["validation"]["accuracy"]`, from its final weights).
- Peak memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the worker (KiB on Linux -> MB),
  which includes the interpreter, torch, the model, the data and the evaluation.

Estimated MFU = useful training FLOPs / train seconds / peak, with peak 175 GFLOP/s (fp32) or
400 GFLOP/s (bf16) unless `--peak-gflops-*` says otherwise, at the precision each run used; the
rate a plain matmul reaches on the machine is measured and printed beside it, for scale. F = the
forward FLOPs of one image at size S, counted with forward hooks on one forward pass as 2 x the
multiply-adds of every convolution and linear layer (batch norm, activations and pooling left out);
F_b is the backbone's share, F_h the head's.
- full: 3 F per image per epoch (forward F, backward 2 F).
- feature-extraction: F_b per image per backbone pass, plus 3 F_h per image per epoch. The
  reference runs the backbone every epoch (passes = epochs); tunesmith caches the frozen features
  (DESIGN §4) so it runs it once (passes = 1).

Run: `python bench/vision.py [--repeats 3] [--workloads full] [--tools reference] [--size 64]
[--quick]`; results go to bench/results/vision-<timestamp>.json and .md (the Markdown table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEED = 42
NUM_CLASSES = 10
DEFAULT_SIZE = 64
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 64
WARMUP_RATIO = 0.06
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
HEAD_DROPOUT = 0.1  # tunesmith's default `model.head_dropout`; the reference network is set to it
LOG_EVERY = 50
MODEL = "efficientnet-lite0"
DATA = "mnist-5k"
# Nominal peaks for the MFU estimate (override with --peak-gflops-*); the measured matmul rate of
# the machine is recorded beside them.
PEAK_GFLOPS = {"fp32": 175.0, "bf16": 400.0}
# tunesmith caches the frozen backbone's features once per run (DESIGN §4, train/cache.py).
TUNESMITH_CACHES_FROZEN_FEATURES = True
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Workload:
    name: str
    epochs: int
    lr: float
    description: str


WORKLOADS = {
    "feature-extraction": Workload("feature-extraction", 5, 2e-3, "frozen backbone, head only"),
    "full": Workload("full", 1, 5e-4, "all weights"),
}


@dataclass(frozen=True)
class Tool:
    """One side of the comparison: `reference` (plain PyTorch loop) at a precision, or `tunesmith`."""

    name: str
    variant: str  # fp32 | bf16 | default

    @property
    def label(self) -> str:
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

    @property
    def train(self) -> Path:
        return self.dir / "train.npz"

    @property
    def test(self) -> Path:
        return self.dir / "heldout.npz"

    @property
    def meta(self) -> Path:
        return self.dir / "meta.json"


# --- packaged data -----------------------------------------------------------------------------


def read_digits() -> tuple[Any, Any]:
    """The packaged MNIST digits: images (N, 28, 28) uint8 and labels (N,) int 0..9."""
    import numpy as np

    from tunesmith.zoo import packaged_data_rows

    rows = [record for record, _ in packaged_data_rows(DATA)]
    images = np.stack([r["image"] for r in rows]).astype(np.uint8)
    labels = np.asarray([int(r["label"]) for r in rows], dtype=np.int64)
    return images, labels


def split_digits(images: Any, labels: Any, n_train: int, n_test: int) -> tuple[tuple, tuple]:
    """Disjoint train and held-out sets, chosen by the SHA-1 of the pixels (file order does not matter)."""
    import numpy as np

    order = sorted(range(len(images)), key=lambda i: hashlib.sha1(images[i].tobytes()).hexdigest())
    if len(order) < n_train + n_test:
        raise SystemExit(f"only {len(order)} digits, asked for {n_train} + {n_test}")
    train, test = np.asarray(order[:n_train]), np.asarray(order[n_train : n_train + n_test])
    return (images[train], labels[train]), (images[test], labels[test])


def prepare_data(root: Path, n_train: int, n_test: int, size: int) -> DataPaths:
    """Write train/held-out `.npz` files and a meta file (sizes, image size, FLOPs) under `root`."""
    import numpy as np

    (train_images, train_labels), (test_images, test_labels) = split_digits(*read_digits(), n_train, n_test)
    paths = DataPaths(root)
    np.savez(paths.train, images=train_images, labels=train_labels)
    np.savez(paths.test, images=test_images, labels=test_labels)
    counts = np.bincount(test_labels, minlength=NUM_CLASSES)
    meta = {
        "n_train": len(train_labels),
        "n_test": len(test_labels),
        "image_size": size,
        "train_classes": np.bincount(train_labels, minlength=NUM_CLASSES).tolist(),
        "test_classes": counts.tolist(),
        "test_majority_share": float(counts.max() / counts.sum()),
        "forward_flops": forward_flops(size),
    }
    paths.meta.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return paths


# --- reference side: a plain PyTorch loop ------------------------------------------------------


def preprocessing(size: int) -> Any:
    """tunesmith's preprocessing of EfficientNet-Lite0 (models/image.py `image_preprocessing`)."""
    from tunesmith.data.transforms import Preprocessing
    from tunesmith.models.efficientnet import INPUT_MEAN, INPUT_STD

    return Preprocessing(size, round(size * 256 / 224), (INPUT_MEAN,) * 3, (INPUT_STD,) * 3)


class ImageSet:
    """A map-style dataset over an `.npz` file: (3, S, S) float image and int label per index.

    Decoding happens in `__getitem__`, i.e. inside the DataLoader, as in any hand-written loop.
    """

    def __init__(self, path: Path, pre: Any) -> None:
        import numpy as np

        with np.load(path) as data:
            self.images, self.labels = data["images"], data["labels"]
        self.pre = pre

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        from PIL import Image

        from tunesmith.data.transforms import eval_transform

        return eval_transform(Image.fromarray(self.images[index]), self.pre), int(self.labels[index])


def build_reference_model(workload: Workload) -> Any:
    """EfficientNet-Lite0 with a seeded new 10-way head; frozen but for the head in feature extraction."""
    import torch

    from tunesmith.models.efficientnet import load_efficientnet_lite0

    net = load_efficientnet_lite0()
    torch.manual_seed(SEED)
    net.classifier = torch.nn.Linear(net.classifier.in_features, NUM_CLASSES)  # default init, as tunesmith's head
    net.dropout.p = HEAD_DROPOUT
    if workload.name == "feature-extraction":
        for name, param in net.named_parameters():
            param.requires_grad = name.startswith("classifier.")
    return net


def training_mode(net: Any, workload: Workload) -> None:
    """Full: everything in train mode. Feature extraction: the backbone (batch norms) in eval mode,
    the dropout before the head and the head in train mode."""
    if workload.name == "feature-extraction":
        net.eval()
        net.dropout.train()
        net.classifier.train()
    else:
        net.train()


def held_out_accuracy(net: Any, dataset: ImageSet, bf16: bool) -> float:
    """Argmax accuracy in batches of EVAL_BATCH_SIZE, under the same autocast as training."""
    import torch
    from torch.utils.data import DataLoader

    net.eval()
    correct = 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for images, labels in DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, num_workers=0):
            correct += int((net(images).argmax(dim=-1) == labels).sum())  # logits (B, 10)
    return correct / len(dataset)


def run_reference(workload: Workload, variant: str, paths: DataPaths, size: int) -> dict[str, Any]:
    """Fine-tune with a plain PyTorch loop; time the loop only (decoding included)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(SEED)
    bf16 = variant == "bf16"
    pre = preprocessing(size)
    net = build_reference_model(workload)
    train_set, test_set = ImageSet(paths.train, pre), ImageSet(paths.test, pre)
    generator = torch.Generator().manual_seed(SEED)
    loader = DataLoader(train_set, batch_size=BATCH_SIZE, shuffle=True, num_workers=0, generator=generator)
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=workload.lr, weight_decay=WEIGHT_DECAY)
    total_steps = len(loader) * workload.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(WARMUP_RATIO * total_steps), total_steps)
    training_mode(net, workload)
    losses = []
    start = time.perf_counter()
    for _ in range(workload.epochs):
        for images, labels in loader:  # (B, 3, S, S) float, (B,) int
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(images), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    accuracy = held_out_accuracy(net, test_set, bf16)
    return {
        "train_seconds": seconds,
        "accuracy": accuracy,
        "precision": variant,
        "trainable": sum(p.numel() for p in params),
        "steps": total_steps,
        "last_loss": sum(losses[-LOG_EVERY:]) / len(losses[-LOG_EVERY:]),
    }


# --- tunesmith side ----------------------------------------------------------------------------


def tunesmith_train_section(workload: Workload) -> dict[str, Any]:
    """The `train:` section; precision is left at tunesmith's default."""
    return {
        "epochs": workload.epochs,
        "lr": workload.lr,
        "batch_size": BATCH_SIZE,
        "warmup_ratio": WARMUP_RATIO,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "scheduler": "linear",
        "seed": SEED,
        "log_every": LOG_EVERY,
    }


def run_tunesmith(workload: Workload, paths: DataPaths, size: int) -> dict[str, Any]:
    """Fine-tune through tunesmith's Python API; training time is the one it reports."""
    import tunesmith

    data = {"train": str(paths.train), "validation": str(paths.test), "image_size": size}
    with tempfile.TemporaryDirectory() as out:
        result = tunesmith.train(
            model=MODEL,
            task="image-classification",
            method={"name": workload.name},
            data=data,
            train=tunesmith_train_section(workload),
            eval={"batch_size": EVAL_BATCH_SIZE},
            output={"dir": out},
        )
        metrics = result.metrics
    reported = metrics["train"]
    return {
        "train_seconds": float(reported["train_seconds"]),
        "accuracy": float(metrics["validation"]["accuracy"]),
        "precision": reported["precision"],
        "trainable": reported.get("trainable_parameters"),
        "steps": reported.get("steps"),
        "reported": {k: reported.get(k) for k in ("samples_per_second", "wall_seconds", "peak_rss_mb")},
    }


# --- worker: one run in its own process --------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_worker(tool: Tool, workload: Workload, paths: DataPaths, out: Path) -> None:
    """Run one configuration and write its result (with throughput and peak RSS) as JSON."""
    import torch

    meta = json.loads(paths.meta.read_text(encoding="utf-8"))
    start = time.perf_counter()
    if tool.name == "reference":
        result = run_reference(workload, tool.variant, paths, meta["image_size"])
    else:
        result = run_tunesmith(workload, paths, meta["image_size"])
    seconds = result["train_seconds"]
    result.update(
        tool=tool.label,
        workload=workload.name,
        wall_seconds=time.perf_counter() - start,
        images_per_second=workload.epochs * meta["n_train"] / seconds,
        peak_rss_mb=peak_rss_mb(),
        cpu_seconds=own_cpu_seconds(),
        threads=torch.get_num_threads(),
    )
    out.write_text(json.dumps(result), encoding="utf-8")


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


def spawn_worker(tool: Tool, workload: Workload, paths: DataPaths, repeat: int) -> dict[str, Any]:
    """Run one configuration in a fresh subprocess; a failure is recorded, never hidden.

    `foreign_load` is the CPU (in cores) that other processes used while the worker ran: the
    machine's busy time minus the worker's own, over the worker's wall time. Above ~0.2 the run
    shared its cores and its timings are suspect.
    """
    out = paths.dir / f"{tool.label}-{workload.name}-{repeat}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--tool", tool.label]
    cmd += ["--workloads", workload.name, "--data-dir", str(paths.dir), "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    busy, start = machine_busy_seconds(), time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    busy, wall = machine_busy_seconds() - busy, time.perf_counter() - start
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"  FAILED {tool.label} {workload.name} (exit {proc.returncode}):\n{tail}", file=sys.stderr)
        return {"tool": tool.label, "workload": workload.name, "repeat": repeat, "error": tail}
    result = json.loads(out.read_text(encoding="utf-8"))
    result.update(repeat=repeat, foreign_load=(busy - result["cpu_seconds"]) / wall)
    return result


# --- FLOPs and the summary ---------------------------------------------------------------------


def forward_flops(size: int) -> dict[str, int]:
    """Forward FLOPs of one size x size image through EfficientNet-Lite0 with a 10-way head:
    2 x the multiply-adds of every conv and linear layer, counted with hooks on one forward pass."""
    import torch
    from torch import nn

    from tunesmith.models.efficientnet import load_efficientnet_lite0

    net = load_efficientnet_lite0(num_classes=NUM_CLASSES, seed=SEED).eval()
    macs = {"backbone": 0, "head": 0}

    def counter(part: str):
        def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if isinstance(module, nn.Conv2d):
                kh, kw = module.kernel_size
                macs[part] += output.numel() * (module.in_channels // module.groups) * kh * kw
            else:
                macs[part] += output.numel() * module.in_features

        return hook

    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            module.register_forward_hook(counter("head" if name.startswith("classifier") else "backbone"))
    with torch.no_grad():
        net(torch.zeros(1, 3, size, size))  # batch 1: the counts are per image
    return {part: 2 * n for part, n in macs.items()}


def train_flops(workload: Workload, tool: Tool, meta: dict[str, Any]) -> float:
    """Useful training FLOPs of one run (formulas in the module docstring)."""
    backbone, head = meta["forward_flops"]["backbone"], meta["forward_flops"]["head"]
    images = meta["n_train"]
    if workload.name == "full":
        return 3 * (backbone + head) * images * workload.epochs
    caches = tool.name == "tunesmith" and TUNESMITH_CACHES_FROZEN_FEATURES
    passes = 1 if caches else workload.epochs
    return backbone * images * passes + 3 * head * images * workload.epochs


NOISY_LOAD = 0.2  # cores used by other processes during a run, above which its timing is suspect
METRICS = ("train_seconds", "images_per_second", "peak_rss_mb", "accuracy", "mfu")


def summarize(runs: list[dict[str, Any]], meta: dict[str, Any], peaks: dict[str, float]) -> dict[str, Any]:
    """Medians per (workload, tool), then tunesmith's ratios against each reference variant.

    Each successful run gets its estimated `mfu` added in place (it is saved with the runs).
    """
    tools = {t.label: t for name in ("reference-fp32", "reference-bf16", "tunesmith") for t in TOOLS[name]}
    summary: dict[str, Any] = {}
    for run in runs:
        if "error" not in run:
            workload, tool = WORKLOADS[run["workload"]], tools[run["tool"]]
            flops = train_flops(workload, tool, meta)
            run["mfu"] = flops / run["train_seconds"] / (peaks[run["precision"]] * 1e9)
    for name in WORKLOADS:
        medians = {}
        for label in tools:
            done = [r for r in runs if r["workload"] == name and r["tool"] == label and "error" not in r]
            if done:
                medians[label] = {m: statistics.median(r[m] for r in done) for m in METRICS}
                medians[label]["precision"] = "/".join(sorted({r["precision"] for r in done}))
                medians[label]["runs"] = len(done)
        if medians:
            summary[name] = {"medians": medians, "ratios": ratios(medians)}
    return summary


def ratios(medians: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    ts = medians.get("tunesmith")
    out = {}
    for ref in ("reference-fp32", "reference-bf16"):
        if ts and ref in medians:
            base = medians[ref]
            out[ref] = {
                "throughput": ts["images_per_second"] / base["images_per_second"],
                "memory": ts["peak_rss_mb"] / base["peak_rss_mb"],
                "accuracy_points": 100 * (ts["accuracy"] - base["accuracy"]),
            }
    return out


def markdown(summary: dict[str, Any], runs: list[dict[str, Any]], header: list[str]) -> str:
    """README-ready tables: one per workload, then tunesmith's ratios; `header` lines go first."""
    noisy = [r for r in runs if r.get("foreign_load", 0.0) > NOISY_LOAD]
    failed = [r for r in runs if "error" in r]
    lines = list(header)
    for name, part in summary.items():
        w = WORKLOADS[name]
        lines += ["", f"### {name}: {w.description}, {w.epochs} epoch(s), lr {w.lr:g}", ""]
        lines += ["| tool | precision | train s | images/s | peak RSS (MB) | accuracy | est. MFU |"]
        lines += ["|---|---|---:|---:|---:|---:|---:|"]
        for label, m in part["medians"].items():
            lines.append(
                f"| {label} | {m['precision']} | {m['train_seconds']:.1f} | {m['images_per_second']:.1f} | "
                f"{m['peak_rss_mb']:.0f} | {m['accuracy']:.3f} | {100 * m['mfu']:.1f}% |"
            )
        if part["ratios"]:
            lines += ["", "| tunesmith vs | throughput (×) | peak memory (×) | accuracy (Δ points) |"]
            lines += ["|---|---:|---:|---:|"]
            for ref, r in part["ratios"].items():
                lines.append(f"| {ref} | {r['throughput']:.2f} | {r['memory']:.2f} | {r['accuracy_points']:+.1f} |")
    if noisy:
        lines += ["", f"Warning: {len(noisy)} run(s) shared the CPU with other processes (> {NOISY_LOAD} cores)."]
    if failed:
        lines += ["", f"Failed: {', '.join(sorted({r['tool'] + '/' + r['workload'] for r in failed}))}."]
    return "\n".join(lines)


# --- harness -----------------------------------------------------------------------------------


def selected_tools(spec: str) -> list[Tool]:
    chosen: list[Tool] = []
    for name in spec.split(","):
        if name not in TOOLS:
            raise SystemExit(f"unknown tool {name!r}; choose from {', '.join(TOOLS)}")
        chosen += [t for t in TOOLS[name] if t not in chosen]
    order = [t for ts in (TOOLS["reference-fp32"], TOOLS["tunesmith"], TOOLS["reference-bf16"]) for t in ts]
    return [t for t in order if t in chosen]


def selected_workloads(spec: str) -> list[Workload]:
    unknown = [n for n in spec.split(",") if n not in WORKLOADS]
    if unknown:
        raise SystemExit(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}")
    return [WORKLOADS[n] for n in spec.split(",")]


def run_all(
    tools: list[Tool], workloads: list[Workload], paths: DataPaths, repeats: int, wait_idle: float
) -> list[dict[str, Any]]:
    """Every run in its own process; tools alternate within a repeat, their order rotating."""
    runs = []
    for repeat in range(repeats):
        order = tools[repeat % len(tools) :] + tools[: repeat % len(tools)]
        for workload in workloads:
            for tool in order:
                print(f"repeat {repeat + 1}/{repeats}  {workload.name:<18} {tool.label} ...", flush=True)
                waited = wait_for_idle(wait_idle)
                run = spawn_worker(tool, workload, paths, repeat)
                run["waited_for_idle_seconds"] = waited
                runs.append(run)
                print_run(run)
    return runs


def print_run(run: dict[str, Any]) -> None:
    if "error" in run:
        return
    print(
        f"  {run['train_seconds']:.1f} s train ({run['wall_seconds']:.0f} s in all), "
        f"{run['images_per_second']:.1f} images/s, {run['precision']}, {run['peak_rss_mb']:.0f} MB, "
        f"accuracy {run['accuracy']:.3f}, other processes {run['foreign_load']:.2f} cores",
        flush=True,
    )


def matmul_gflops(dtype_name: str, size: tuple[int, int, int] = (2048, 512, 2048), budget: float = 1.0) -> float:
    """Measured rate of a plain matmul (M, K) @ (K, N): what this CPU really reaches (for scale)."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    m, k, n = size
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(2):
        a @ b  # warm-up (kernel selection)
    start, repeats = time.perf_counter(), 0
    while repeats < 3 or time.perf_counter() - start < budget:
        a @ b
        repeats += 1
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def header_lines(meta: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> list[str]:
    measured = env["matmul_gflops"]
    flops = meta["forward_flops"]
    size = meta["image_size"]
    return [
        f"Data: {meta['n_train']} train / {meta['n_test']} held-out MNIST digits at {size}x{size}; "
        f"{MODEL}; medians of {args.repeats} repeat(s); {env['cpu_count']} CPU(s), torch {env['torch']}, "
        f"{env['threads']} threads. Always answering the majority class scores "
        f"{meta['test_majority_share']:.3f} on the held-out set.",
        f"Forward: {(flops['backbone'] + flops['head']) / 1e6:.0f} MFLOP per image. "
        f"Est. MFU against {args.peak_gflops_fp32:g} (fp32) / {args.peak_gflops_bf16:g} (bf16) GFLOP/s; "
        f"a plain matmul measures {measured['fp32']:.0f} / {measured['bf16']:.0f} GFLOP/s here.",
    ]


def environment() -> dict[str, Any]:
    import PIL
    import torch
    import transformers

    return {
        "matmul_gflops": {name: matmul_gflops(name) for name in ("fp32", "bf16")},
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_bf16": torch.cpu._is_avx512_bf16_supported(),
        "machine": platform.platform(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="Repeats per configuration (median).")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="Comma-separated workloads.")
    parser.add_argument("--tools", default="reference,tunesmith", help=f"Comma-separated of {', '.join(TOOLS)}.")
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="Side of the square input, in pixels.")
    parser.add_argument("--train-size", type=int, default=4000)
    parser.add_argument("--test-size", type=int, default=1000)
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=300.0,
        help="Before each run, wait up to this many seconds for other processes to leave the CPU.",
    )
    parser.add_argument("--peak-gflops-fp32", type=float, default=PEAK_GFLOPS["fp32"], help="For the MFU.")
    parser.add_argument("--peak-gflops-bf16", type=float, default=PEAK_GFLOPS["bf16"], help="For the MFU.")
    parser.add_argument("--quick", action="store_true", help="Smoke test: 400 / 200 images, 1 repeat.")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.repeats = 400, 200, 1
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        (tool,) = selected_tools(args.tool)
        (workload,) = selected_workloads(args.workloads)
        run_worker(tool, workload, DataPaths(args.data_dir), args.out)
        return 0
    tools, workloads = selected_tools(args.tools), selected_workloads(args.workloads)
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        paths = prepare_data(Path(tmp), args.train_size, args.test_size, args.size)
        meta = json.loads(paths.meta.read_text(encoding="utf-8"))
        env = environment()  # measures matmul rates: before the runs, while nothing else of ours runs
        runs = run_all(tools, workloads, paths, args.repeats, args.wait_idle)
    summary = summarize(runs, meta, {"fp32": args.peak_gflops_fp32, "bf16": args.peak_gflops_bf16})
    table = markdown(summary, runs, header_lines(meta, args, env))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / f"vision-{time.strftime('%Y%m%d-%H%M%S')}"
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "environment": env, "data": meta}
    record.update(runs=runs, summary=summary, markdown=table)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    stem.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print("\n" + table + f"\n\nWritten to {stem}.json and {stem}.md")
    failed = [r for r in runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
