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

Method of measurement (the harness, bench/harness.py, shared with bench/classification.py). Every
(tool, variant, workload, repeat) runs in a fresh `python bench/vision.py --worker ...` subprocess,
so peak memory is per run. Within a repeat the tools alternate (reference fp32, tunesmith, reference
bf16; the order rotates each repeat) to spread machine noise; the report gives medians over repeats.
Before each run the harness waits (`--wait-idle`) for other processes to leave the CPU, and records
how many cores they used while the run went on (`foreign_load`, from /proc/stat minus the worker's
own CPU time); runs above 0.2 cores are flagged.

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

Estimated MFU = useful training FLOPs / train seconds / peak, with peak the machine's
2048² matmul rate measured in the same run (bench/harness.py `matmul_peak`;
`--peak-gflops-*` overrides), at the precision each run used; the
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
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import harness
from harness import DataPaths, Tool, Workload

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
# tunesmith caches the frozen backbone's features once per run (DESIGN §4, train/cache.py).
TUNESMITH_CACHES_FROZEN_FEATURES = True
DATA_SUFFIX = ".npz"  # of the train and held-out files (harness.DataPaths)
SCRIPT = Path(__file__).resolve()  # what a worker process runs

WORKLOADS = {
    "feature-extraction": Workload("feature-extraction", 5, 2e-3, "frozen backbone, head only"),
    "full": Workload("full", 1, 5e-4, "all weights"),
}


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
    paths = DataPaths(root, DATA_SUFFIX)
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


def run_worker(tool: Tool, workload: Workload, paths: DataPaths, out: Path) -> None:
    """Run one configuration and write its result (with throughput and peak RSS) as JSON."""
    import torch

    meta = paths.read_meta()
    start = time.perf_counter()
    if tool.name == "reference":
        result = run_reference(workload, tool.variant, paths, meta["image_size"])
    else:
        result = run_tunesmith(workload, paths, meta["image_size"])
    rates = {"images_per_second": workload.epochs * meta["n_train"] / result["train_seconds"]}
    harness.write_worker_result(out, result, tool, workload, start, rates, {"threads": torch.get_num_threads()})


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


METRICS = ("train_seconds", "images_per_second", "peak_rss_mb", "accuracy", "mfu")
COLUMNS = [
    "| tool | precision | train s | images/s | peak RSS (MB) | accuracy | est. MFU |",
    "|---|---|---:|---:|---:|---:|---:|",
]


def table_row(label: str, m: dict[str, Any]) -> str:
    """One tool's medians as a row under COLUMNS."""
    return (
        f"| {label} | {m['precision']} | {m['train_seconds']:.1f} | {m['images_per_second']:.1f} | "
        f"{m['peak_rss_mb']:.0f} | {m['accuracy']:.3f} | {100 * m['mfu']:.1f}% |"
    )


# --- running it --------------------------------------------------------------------------------


def print_run(run: dict[str, Any]) -> None:
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
        "Est. MFU against the measured 2048² matmul peak, "
        f"{harness.peaks(args)['fp32']:.0f} (fp32) / {harness.peaks(args)['bf16']:.0f} (bf16) GFLOP/s; "
        f"an encoder-sized matmul reaches {measured['fp32']:.0f} / {measured['bf16']:.0f}.",
    ]


def size_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE, help="Side of the square input, in pixels.")


def main(argv: list[str] | None = None) -> int:
    global SEED  # a worker of a --seeds run trains with its repeat's seed
    description = __doc__.splitlines()[0]
    args = harness.parse_args(
        argv, description, WORKLOADS, sizes=(4000, 1000), quick=(400, 200), unit="images", own_options=size_option
    )
    if args.worker:
        if args.seed is not None:  # --seeds: this repeat's seed, for every side alike
            SEED = args.seed
        return harness.run_as_worker(args, WORKLOADS, DATA_SUFFIX, run_worker)
    import PIL

    tools, workloads = harness.selected_tools(args.tools), harness.selected_workloads(args.workloads, WORKLOADS)
    worker_env = harness.worker_env()
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        paths = prepare_data(Path(tmp), args.train_size, args.test_size, args.size)
        meta = paths.read_meta()
        # measures matmul rates: before the runs, while nothing else of ours runs
        env = harness.environment(matmul_gflops, {"pillow": PIL.__version__})
        first_seed = SEED if args.seeds else None
        runs = harness.run_all(
            SCRIPT, worker_env, tools, workloads, paths.dir, args.repeats, args.wait_idle, print_run, first_seed
        )
    flops = partial(train_flops, meta=meta)
    summary = harness.summarize(
        runs, WORKLOADS, METRICS, flops, harness.peaks(args), "images_per_second", joined=("precision",)
    )
    table = harness.markdown(summary, runs, header_lines(meta, args, env), WORKLOADS, COLUMNS, table_row)
    stem = harness.RESULTS_DIR / f"vision-{time.strftime('%Y%m%d-%H%M%S')}"
    harness.write_record(stem.with_suffix(".json"), args, env, meta, runs, summary, table)
    stem.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print("\n" + table + f"\n\nWritten to {stem}.json and {stem}.md")
    failed = [r for r in runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
