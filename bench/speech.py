"""Benchmark: tunesmith against the Hugging Face Trainer (+ peft) on keyword spotting.

Both sides fine-tune the packaged Whisper tiny.en (converted once from CTranslate2 to a transformers
directory, `tunesmith.models.load.resolve_model_path("whisper-tiny-en")`; both load that directory)
on the spoken commands the repo ships (examples/data/spoken-commands: 20 words, 800 train / 200
validation / 200 test clips, 16 kHz mono, at most 0.8 s), with the same data, seed and
hyperparameters, for three workloads: `feature-extraction` (frozen encoder, only the head trains,
10 epochs, lr 3e-3), `lora` (r 8, alpha 16, dropout 0.05 on every linear of the encoder blocks:
q/k/v/out projections, fc1, fc2; 3 epochs, lr 1e-3, head lr 3e-3) and `full` (every weight, 3 epochs,
lr 1e-4, head lr 3e-3). Shared: batch 32, AdamW with weight decay 0.01 (not on biases and norms),
linear schedule with warmup ratio 0.06, max grad norm 1.0, seed 42. Training is on train, accuracy is
measured on test.

Input. Whisper's encoder takes a 30 s window; both sides cut it to 1 s (`MAX_SECONDS`): 50 encoder
positions, 100 mel frames, with `tunesmith.models.speech.shorten_encoder` (the first 50 rows of the
position table), and both pad every clip to 1 s with `WhisperFeatureExtractor(max_length=16000,
padding="max_length", truncation=True)`. tunesmith gets `data.max_seconds: 1.0`.

Data. The clips of each split are ordered by the SHA-1 of their file bytes within each word and
taken round-robin over the words, so a smaller `--train-size` / `--test-size` stays balanced and
deterministic. They are listed (absolute path, word) in JSONL files in a temp dir. tunesmith reads
those as its train, validation and test sets; the reference decodes the same files with soundfile.

The reference is what a practitioner writes with transformers 5: `WhisperForAudioClassification`
(the encoder, a projector to 256, mean pooling over all 50 positions, a linear classifier; built
after `transformers.set_seed(42)`), its encoder cut as above, a torch `Dataset` that decodes a clip
and computes its log-mel features in `__getitem__` (so inside the timed training, as tunesmith's
batches are built), `Trainer` with `TrainingArguments(use_cpu=True, warmup_steps=0.06, ...)`.
Feature extraction calls `freeze_encoder()` (projector and classifier train, the whole encoder runs
on every batch of every epoch). LoRA is peft's `LoraConfig` on the same 24 linears with the projector
and classifier in `modules_to_save`. The head learning rate: `Trainer` has no option for one, so the
reference passes its own `torch.optim.AdamW` over parameter groups (encoder lr / head lr, each with
the Trainer's decay rule: no decay on biases and norms) through `Trainer(optimizers=(optimizer,
None))`, the documented way to set groups; the Trainer still builds the linear schedule. Two
precisions: fp32 (Trainer's default) and bf16 (`bf16=True`, autocast on CPU). tunesmith runs at its
default precision (`train.precision: auto`), recorded from `metrics["train"]["precision"]`.

Differences that remain, from the stock classes: the reference's head is projector (384 -> 256) +
classifier (104k weights), tunesmith's one linear layer (7.7k) with dropout 0.1 before it; the
reference averages all 50 positions (padding included), tunesmith only the positions that hold the
clip. The encoder weights that train are the same on both sides (the position table stays frozen).

Not measured: the reference on Whisper's default 30 s window (a `reference-30s` tool). It costs
about 37 GFLOP per clip forward (30 x the linears of the 1 s encoder plus attention over 1,500
positions); on a 2-core Xeon (avx512_bf16) one fp32 training step of 8 clips took 18.6 s and a
forward 3.6 s: about 31 minutes per epoch of `full` and 6 per epoch of `feature-extraction` over
800 clips, several hours per repeat.

Method of measurement: bench/harness.py, as for bench/vision.py. Every (tool, variant, workload,
repeat) runs in a fresh `python bench/speech.py --worker ...` subprocess; within a repeat the tools
alternate (their order rotates each repeat) and the report gives medians over repeats; before each
run the harness waits (`--wait-idle`) for other processes to leave the CPU and records the cores
they used meanwhile (`foreign_load`; runs above 0.2 cores are flagged).

- Training time: wall time around `trainer.train()` (reference), or tunesmith's own
  `metrics["train"]["train_seconds"]` (which includes decoding and, in feature extraction, its
  one-off caching of the frozen features of the train and validation clips, and leaves out its
  per-epoch validation and checkpoint writes). Model loading and the final evaluation are outside
  both; `wall_seconds` (the whole worker) is kept too.
- Throughput: clips/s = epochs * n_train / seconds, the same formula for both; tunesmith's
  self-reported `samples_per_second` is kept as well.
- Accuracy: argmax over the test clips after training (batches of 64, same autocast as training;
  tunesmith's `metrics["test"]["accuracy"]`, from its final weights).
- Peak memory: `resource.getrusage(RUSAGE_SELF).ru_maxrss` of the worker (KiB on Linux -> MB).

Estimated MFU = useful training FLOPs / train seconds / peak, with peak the machine's
2048² matmul rate measured in the same run (bench/harness.py `matmul_peak`;
`--peak-gflops-*` overrides), at the precision each run used; the rate
an encoder-sized matmul reaches on the machine is measured in the same run and printed beside it, with
the CPU model (lscpu) and whether it has BF16 instructions. F = forward FLOPs of one clip through
the cut encoder and tunesmith's head, counted with forward hooks as 2 x the multiply-adds of every
convolution and linear layer (attention scores, about 2% at 50 positions, norms and activations left
out): F_s the conv stem's share, F_b the blocks', F_h the head's, F_l what LoRA's matrices add.
- full: 3 F per clip per epoch (forward F, backward 2 F).
- lora: (F_s + 2 F_b + 3 F_l + 3 F_h) per clip per epoch: the stem forward only, the blocks forward
  and the activation gradients through their frozen weights, the LoRA matrices and the head in full.
- feature-extraction: (F_s + F_b) per clip per encoder pass, plus 3 F_h per clip per epoch. The
  reference runs the encoder every epoch (passes = epochs); tunesmith caches the frozen features
  (DESIGN §4) so it runs it once (passes = 1).

Run: `python bench/speech.py [--repeats 3] [--workloads lora] [--tools reference-fp32,tunesmith]
[--quick]` (--quick: 160 train / 100 validation / 100 test clips, one epoch, one repeat); results go
to bench/results/speech-<timestamp>.json and .md (the Markdown table).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import harness
from harness import DataPaths, Tool, Workload

SEED = 42
MAX_SECONDS = 1.0  # clips padded to this, the encoder cut to it: 50 positions, 100 mel frames
SAMPLE_RATE = 16000
MAX_SAMPLES = round(SAMPLE_RATE * MAX_SECONDS)
BATCH_SIZE = 32
EVAL_BATCH_SIZE = 64
WARMUP_RATIO = 0.06
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
LORA = {"r": 8, "alpha": 16, "dropout": 0.05}
# Every linear of the encoder blocks, as tunesmith's default LoRA targets; peft full-matches the string.
LORA_TARGETS = r"encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|fc1|fc2)"
HEAD_MODULES = ("projector", "classifier")  # the reference's new head
MODEL = "whisper-tiny-en"
DATA_ROOT = Path(__file__).resolve().parent.parent / "examples" / "data" / "spoken-commands"
# tunesmith caches the frozen encoder's features once per run (DESIGN §4, training/input_cache.py).
TUNESMITH_CACHES_FROZEN_FEATURES = True
DATA_SUFFIX = ".jsonl"  # of the train and held-out files (harness.DataPaths)
SCRIPT = Path(__file__).resolve()  # what a worker process runs

WORKLOADS = {
    "feature-extraction": Workload("feature-extraction", 10, 3e-3, "frozen encoder, head only"),
    "lora": Workload("lora", 3, 1e-3, "LoRA r=8 alpha=16 on every encoder-block linear, head lr 3e-3"),
    "full": Workload("full", 3, 1e-4, "all weights, head lr 3e-3"),
}
HEAD_LR = {"lora": 3e-3, "full": 3e-3}  # the new head's learning rate where it differs from `lr`


# --- packaged data -----------------------------------------------------------------------------


def model_dir() -> str:
    """The transformers directory of the packaged Whisper tiny.en (converted once, then cached)."""
    from tunesmith.models.load import resolve_model_path

    return resolve_model_path(MODEL)


def read_split(split: str) -> list[tuple[Path, str]]:
    """(clip, word) of one split of the spoken commands, from its `<word>/*.ogg` folders."""
    root = DATA_ROOT / split
    if not root.is_dir():
        raise SystemExit(f"{root} is missing: the spoken commands ship with the repo under {DATA_ROOT}")
    return [(clip, folder.name) for folder in sorted(root.iterdir()) for clip in sorted(folder.glob("*.ogg"))]


def pick_balanced(clips: list[tuple[Path, str]], n: int, split: str) -> list[tuple[Path, str]]:
    """`n` clips taken round-robin over the words, each word's clips in the order of their SHA-1."""
    if n > len(clips):
        raise SystemExit(f"the {split} split has {len(clips)} clips, asked for {n}")
    by_word: dict[str, list[Path]] = {}
    for clip, word in clips:
        by_word.setdefault(word, []).append(clip)
    for paths in by_word.values():
        paths.sort(key=lambda p: hashlib.sha1(p.read_bytes()).hexdigest())
    longest = max(len(paths) for paths in by_word.values())
    order = [(ps[i], w) for i in range(longest) for w, ps in sorted(by_word.items()) if i < len(ps)]
    return order[:n]


def check_clips(clips: list[tuple[Path, str]]) -> float:
    """The longest clip in seconds; every clip must be 16 kHz mono and fit in MAX_SECONDS."""
    import soundfile

    longest = 0.0
    for clip, _ in clips:
        info = soundfile.info(str(clip))
        if info.samplerate != SAMPLE_RATE or info.channels != 1:
            raise SystemExit(f"{clip}: {info.samplerate} Hz, {info.channels} channel(s); expected 16 kHz mono")
        longest = max(longest, info.frames / info.samplerate)
    if longest > MAX_SECONDS:
        raise SystemExit(f"a clip lasts {longest:.2f} s, longer than the {MAX_SECONDS} s both sides pad to")
    return longest


def validation_file(paths: DataPaths) -> Path:
    """tunesmith's validation set (the reference does not use it)."""
    return paths.dir / f"validation{DATA_SUFFIX}"


def write_jsonl(path: Path, clips: list[tuple[Path, str]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for clip, word in clips:
            fh.write(json.dumps({"audio": str(clip), "label": word}) + "\n")


def read_jsonl(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def prepare_data(root: Path, n_train: int, n_test: int, workloads: dict[str, Workload]) -> DataPaths:
    """Write train / validation / held-out JSONL and a meta file (sizes, words, FLOPs, epochs) under `root`."""
    train = pick_balanced(read_split("train"), n_train, "train")
    validation = pick_balanced(read_split("validation"), n_test, "validation")
    test = pick_balanced(read_split("test"), n_test, "test")
    paths = DataPaths(root, DATA_SUFFIX)
    for path, clips in ((paths.train, train), (validation_file(paths), validation), (paths.test, test)):
        write_jsonl(path, clips)
    words = sorted({w for _, w in train})
    test_counts = [sum(w == word for _, w in test) for word in words]
    meta = {
        "n_train": len(train),
        "n_validation": len(validation),
        "n_test": len(test),
        "labels": words,
        "longest_clip_seconds": check_clips(train + validation + test),
        "max_seconds": MAX_SECONDS,
        "test_majority_share": max(test_counts) / len(test),
        "epochs": {name: w.epochs for name, w in workloads.items()},
        "forward_flops": forward_flops(len(words)),
    }
    paths.meta.write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return paths


# --- reference side: Trainer (+ peft) ----------------------------------------------------------


def read_clip(path: str) -> Any:
    """A clip's samples (N,) float32 at 16 kHz, decoded with soundfile."""
    import soundfile

    wave, rate = soundfile.read(path, dtype="float32")
    if rate != SAMPLE_RATE:
        raise SystemExit(f"{path}: {rate} Hz, expected {SAMPLE_RATE}")
    return wave if wave.ndim == 1 else wave.mean(axis=1)


class ClipSet:
    """A map-style dataset over a JSONL file of (clip, word): log-mel features (80, 100) and label.

    Decoding and featurizing happen in `__getitem__`, i.e. inside the Trainer's DataLoader.
    """

    def __init__(self, path: Path, labels: list[str], extractor: Any) -> None:
        self.rows = read_jsonl(path)
        self.index = {label: i for i, label in enumerate(labels)}
        self.extractor = extractor

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        import torch

        row = self.rows[i]
        features = self.extractor(
            read_clip(row["audio"]),
            sampling_rate=SAMPLE_RATE,
            max_length=MAX_SAMPLES,
            padding="max_length",
            truncation=True,
            return_tensors="np",
        )["input_features"][0]  # (80, 100)
        return {"input_features": torch.from_numpy(features), "labels": self.index[row["label"]]}


def build_reference_model(workload: Workload, num_labels: int) -> Any:
    """WhisperForAudioClassification with its encoder cut to MAX_SECONDS, frozen or wrapped for the workload."""
    import torch
    import transformers
    from transformers import WhisperForAudioClassification

    from tunesmith.models.speech import shorten_encoder

    transformers.set_seed(SEED)  # the new projector's and classifier's init
    model = WhisperForAudioClassification.from_pretrained(model_dir(), num_labels=num_labels, dtype=torch.float32)
    frames = shorten_encoder(model, MAX_SECONDS)
    if frames != MAX_SAMPLES // 160:  # the feature extractor's hop is 160 samples
        raise SystemExit(f"the cut encoder expects {frames} mel frames, the clips give {MAX_SAMPLES // 160}")
    if workload.name == "feature-extraction":
        model.freeze_encoder()
    elif workload.name == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules=LORA_TARGETS,
            modules_to_save=list(HEAD_MODULES),
        )
        model = get_peft_model(model, config)
    return model


def reference_optimizer(model: Any, workload: Workload) -> Any:
    """AdamW over (encoder lr | head lr) x (decay | no decay: biases and norms, the Trainer's rule)."""
    import torch

    head_lr = HEAD_LR.get(workload.name, workload.lr)
    groups: dict[tuple[float, float], list[Any]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            lr = head_lr if any(f"{m}." in name for m in HEAD_MODULES) else workload.lr
            decay = 0.0 if param.ndim < 2 or "bias" in name or "norm" in name else WEIGHT_DECAY
            groups.setdefault((lr, decay), []).append(param)
    params = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]
    return torch.optim.AdamW(params, lr=workload.lr)


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
        remove_unused_columns=False,
        label_names=["labels"],
        disable_tqdm=True,
    )


def held_out_accuracy(model: Any, dataset: ClipSet, bf16: bool) -> float:
    """Argmax accuracy in batches of EVAL_BATCH_SIZE, under the same autocast as training."""
    import torch
    from torch.utils.data import DataLoader

    model.eval()
    correct = 0
    for batch in DataLoader(dataset, batch_size=EVAL_BATCH_SIZE, num_workers=0):  # featurized in fp32
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(input_features=batch["input_features"]).logits  # (B, labels)
        correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return correct / len(dataset)


def run_reference(workload: Workload, variant: str, paths: DataPaths, labels: list[str]) -> dict[str, Any]:
    """Fine-tune with the HF Trainer; time `trainer.train()` only (decoding included)."""
    from transformers import Trainer, WhisperFeatureExtractor, default_data_collator

    extractor = WhisperFeatureExtractor.from_pretrained(model_dir())
    model = build_reference_model(workload, len(labels))
    train_set, test_set = ClipSet(paths.train, labels, extractor), ClipSet(paths.test, labels, extractor)
    optimizer = reference_optimizer(model, workload)
    with tempfile.TemporaryDirectory() as out:
        args = reference_args(workload, variant, out)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_set,
            data_collator=default_data_collator,
            optimizers=(optimizer, None),  # the Trainer still builds the linear schedule
        )
        start = time.perf_counter()
        output = trainer.train()
        seconds = time.perf_counter() - start
    accuracy = held_out_accuracy(model, test_set, bf16=variant == "bf16")
    return {
        "train_seconds": seconds,
        "accuracy": accuracy,
        "precision": variant,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps": output.global_step,
        "train_loss": output.training_loss,
    }


# --- tunesmith side ----------------------------------------------------------------------------


def tunesmith_method(workload: Workload) -> dict[str, Any]:
    if workload.name == "lora":
        return {"name": "lora", **LORA}
    return {"name": workload.name}


def tunesmith_train_section(workload: Workload) -> dict[str, Any]:
    """The `train:` section; precision is left at tunesmith's default."""
    return {
        "epochs": workload.epochs,
        "lr": workload.lr,
        "head_lr": HEAD_LR.get(workload.name),
        "batch_size": BATCH_SIZE,
        "warmup_ratio": WARMUP_RATIO,
        "weight_decay": WEIGHT_DECAY,
        "max_grad_norm": MAX_GRAD_NORM,
        "scheduler": "linear",
        "seed": SEED,
    }


def run_tunesmith(workload: Workload, paths: DataPaths) -> dict[str, Any]:
    """Fine-tune through tunesmith's Python API; training time is the one it reports."""
    import tunesmith

    data = {
        "train": str(paths.train),
        "validation": str(validation_file(paths)),
        "test": str(paths.test),
        "max_seconds": MAX_SECONDS,
    }
    with tempfile.TemporaryDirectory() as out:
        result = tunesmith.train(
            model=MODEL,
            task="audio-classification",
            method=tunesmith_method(workload),
            data=data,
            train=tunesmith_train_section(workload),
            eval={"batch_size": EVAL_BATCH_SIZE},
            output={"dir": out},
        )
        metrics = result.metrics
    reported = metrics["train"]
    return {
        "train_seconds": float(reported["train_seconds"]),
        "accuracy": float(metrics["test"]["accuracy"]),
        "precision": reported["precision"],
        "trainable": reported.get("trainable_parameters"),
        "steps": reported.get("steps"),
        "reported": {k: reported.get(k) for k in ("samples_per_second", "wall_seconds", "peak_rss_mb")},
    }


# --- worker: one run in its own process --------------------------------------------------------


def run_worker(tool: Tool, workload: Workload, paths: DataPaths, out: Path) -> None:
    """Run one configuration (its epochs from the meta file, for --quick) and write its result as JSON."""
    import torch

    meta = paths.read_meta()
    workload = dataclasses.replace(workload, epochs=meta["epochs"][workload.name])
    start = time.perf_counter()
    if tool.name == "reference":
        result = run_reference(workload, tool.variant, paths, meta["labels"])
    else:
        result = run_tunesmith(workload, paths)
    rates = {"clips_per_second": workload.epochs * meta["n_train"] / result["train_seconds"]}
    harness.write_worker_result(out, result, tool, workload, start, rates, {"threads": torch.get_num_threads()})


# --- FLOPs and the summary ---------------------------------------------------------------------


def forward_flops(num_labels: int) -> dict[str, int]:
    """Forward FLOPs of one clip through the cut encoder and a new linear head of `num_labels`: 2 x the
    multiply-adds of every conv and linear layer (hooks on one forward pass), and what LoRA's matrices add."""
    import torch
    from torch import nn
    from transformers import AutoModel

    from tunesmith.models.speech import shorten_encoder

    whisper = AutoModel.from_pretrained(model_dir(), dtype=torch.float32)
    frames = shorten_encoder(whisper, MAX_SECONDS)
    encoder = whisper.get_encoder().eval()
    macs = {"stem": 0, "blocks": 0, "lora": 0}

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv1d):
            macs["stem"] += output.numel() * module.in_channels * module.kernel_size[0]
        else:
            macs["blocks"] += output.numel() * module.in_features
            macs["lora"] += output.shape[1] * LORA["r"] * (module.in_features + module.out_features)

    for name, module in encoder.named_modules():
        if isinstance(module, nn.Conv1d) or (isinstance(module, nn.Linear) and name.startswith("layers.")):
            module.register_forward_hook(hook)
    with torch.no_grad():
        hidden = encoder(torch.zeros(1, encoder.config.num_mel_bins, frames)).last_hidden_state  # (1, P, D)
    flops = {part: 2 * n for part, n in macs.items()}
    return {**flops, "head": 2 * encoder.config.d_model * num_labels, "positions": hidden.shape[1]}


def train_flops(workload: Workload, tool: Tool, meta: dict[str, Any]) -> float:
    """Useful training FLOPs of one run (formulas in the module docstring)."""
    f = meta["forward_flops"]
    clips = meta["n_train"] * workload.epochs
    if workload.name == "full":
        return 3 * (f["stem"] + f["blocks"] + f["head"]) * clips
    if workload.name == "lora":
        return (f["stem"] + 2 * f["blocks"] + 3 * f["lora"] + 3 * f["head"]) * clips
    caches = tool.name == "tunesmith" and TUNESMITH_CACHES_FROZEN_FEATURES
    passes = 1 if caches else workload.epochs
    return (f["stem"] + f["blocks"]) * meta["n_train"] * passes + 3 * f["head"] * clips


METRICS = ("train_seconds", "clips_per_second", "peak_rss_mb", "accuracy", "mfu")
COLUMNS = [
    "| tool | precision | train s | clips/s | peak RSS (MB) | accuracy | est. MFU |",
    "|---|---|---:|---:|---:|---:|---:|",
]


def table_row(label: str, m: dict[str, Any]) -> str:
    """One tool's medians as a row under COLUMNS."""
    return (
        f"| {label} | {m['precision']} | {m['train_seconds']:.1f} | {m['clips_per_second']:.1f} | "
        f"{m['peak_rss_mb']:.0f} | {m['accuracy']:.3f} | {100 * m['mfu']:.1f}% |"
    )


# --- running it --------------------------------------------------------------------------------


def print_run(run: dict[str, Any]) -> None:
    print(
        f"  {run['train_seconds']:.1f} s train ({run['wall_seconds']:.0f} s in all), "
        f"{run['clips_per_second']:.1f} clips/s, {run['precision']}, {run['peak_rss_mb']:.0f} MB, "
        f"accuracy {run['accuracy']:.3f}, other processes {run['foreign_load']:.2f} cores",
        flush=True,
    )


def matmul_gflops(dtype_name: str, size: tuple[int, int, int] = (1600, 384, 1536), budget: float = 1.0) -> float:
    """Measured rate of an encoder-sized matmul (B*P, D) @ (D, 4D): what this CPU really reaches."""
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    m, k, n = size
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    for _ in range(3):
        a @ b  # warm-up (kernel selection)
    start, repeats = time.perf_counter(), 0
    while repeats < 3 or time.perf_counter() - start < budget:
        a @ b
        repeats += 1
    return 2 * m * k * n * repeats / (time.perf_counter() - start) / 1e9


def cpu_model() -> str:
    """The CPU's model name, as lscpu prints it ("unknown" where lscpu is missing)."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name:")]
    return names[0] if names else "unknown"


def versions() -> dict[str, str]:
    """What the environment record adds to harness.environment: the CPU model and library versions."""
    import peft
    import soundfile

    return {"cpu_model": cpu_model(), "peft": peft.__version__, "soundfile": soundfile.__version__}


def cpu_line(env: dict[str, Any]) -> str:
    bf16 = "yes" if env["cpu_bf16"] else "no"
    cores = f"{env['cpu_count']} cores, {env['threads']} torch threads"
    return f"CPU: {env['cpu_model']} ({cores}); BF16 (avx512_bf16): {bf16}."


def header_lines(meta: dict[str, Any], args: argparse.Namespace, env: dict[str, Any]) -> list[str]:
    measured = env["matmul_gflops"]
    f = meta["forward_flops"]
    forward = f["stem"] + f["blocks"] + f["head"]
    return [
        f"Data: {meta['n_train']} train / {meta['n_test']} test spoken commands ({len(meta['labels'])} words; "
        f"tunesmith also validates on {meta['n_validation']}), padded to {meta['max_seconds']:g} s "
        f"({f['positions']} encoder positions); {MODEL}; medians of {args.repeats} repeat(s); torch "
        f"{env['torch']}, transformers {env['transformers']}, peft {env['peft']}. Always answering the "
        f"majority class scores {meta['test_majority_share']:.3f} on the test set.",
        cpu_line(env),
        f"Forward: {forward / 1e6:.0f} MFLOP per clip. Est. MFU against the measured 2048² matmul peak, "
        f"{harness.peaks(args)['fp32']:.0f} (fp32) / {harness.peaks(args)['bf16']:.0f} (bf16) GFLOP/s; "
        f"a model-sized matmul reaches {measured['fp32']:.0f} / {measured['bf16']:.0f}.",
    ]


def main(argv: list[str] | None = None) -> int:
    global SEED  # a worker of a --seeds run trains with its repeat's seed
    description = __doc__.splitlines()[0]
    args = harness.parse_args(argv, description, WORKLOADS, sizes=(800, 200), quick=(160, 100), unit="clips")
    if args.worker:
        if args.seed is not None:  # --seeds: this repeat's seed, for every side alike
            SEED = args.seed
        return harness.run_as_worker(args, WORKLOADS, DATA_SUFFIX, run_worker)
    tools, workloads = harness.selected_tools(args.tools), harness.selected_workloads(args.workloads, WORKLOADS)
    # --quick: one epoch each; the workers read the epochs from the meta file
    effective = {n: dataclasses.replace(w, epochs=1) if args.quick else w for n, w in WORKLOADS.items()}
    worker_env = harness.worker_env(TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        paths = prepare_data(Path(tmp), args.train_size, args.test_size, effective)
        meta = paths.read_meta()
        # measures matmul rates: before the runs, while nothing else of ours runs
        env = harness.environment(matmul_gflops, versions())
        print(cpu_line(env), flush=True)
        first_seed = SEED if args.seeds else None
        runs = harness.run_all(
            SCRIPT, worker_env, tools, workloads, paths.dir, args.repeats, args.wait_idle, print_run, first_seed
        )
    flops = partial(train_flops, meta=meta)
    summary = harness.summarize(
        runs, effective, METRICS, flops, harness.peaks(args), "clips_per_second", joined=("precision",)
    )
    table = harness.markdown(summary, runs, header_lines(meta, args, env), effective, COLUMNS, table_row)
    stem = harness.RESULTS_DIR / f"speech-{time.strftime('%Y%m%d-%H%M%S')}"
    harness.write_record(stem.with_suffix(".json"), args, env, meta, runs, summary, table)
    stem.with_suffix(".md").write_text(table + "\n", encoding="utf-8")
    print("\n" + table + f"\n\nWritten to {stem}.json and {stem}.md")
    failed = [r for r in runs if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
