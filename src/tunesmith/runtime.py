"""Where and how tensors are computed: one `Runtime` per command, built once and passed down.

It holds the device, the precision (bf16 autocast with fp32 master weights, or fp32), the CPU
threads and the evaluation batch size; nothing else decides where tensors live or which autocast
applies.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tunesmith.config import EvalConfig, TrainConfig
from tunesmith.machine import machine_key, remembered

__all__ = [
    "Runtime",
    "bf16_probe",
    "conv_precision_probe",
    "make_runtime",
    "matmul_gflops",
    "resolve_precision",
    "trains_convolutions",
    "trial_steps",
]

Precision = Literal["fp32", "bf16"]
PROBE_PIXELS = 16 * 64 * 64  # pixels a conv-precision probe runs, at most (the run's batch, fewer where large)


@dataclass(frozen=True)
class Runtime:
    """The device, precision, threads and evaluation batch size of one command."""

    device: torch.device
    precision: Precision
    eval_batch_size: int
    threads: int | None = None

    def autocast(self) -> AbstractContextManager[Any]:
        """bf16 autocast where the precision is bf16 (matmuls in bf16; master weights, loss and
        gradients stay fp32), a no-op in fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def make_runtime(train: TrainConfig, evaluation: EvalConfig, model: torch.nn.Module | None = None) -> Runtime:
    """The runtime of a command: a GPU where there is one, else the CPU with `train.threads`
    threads; `train.precision` resolved for this machine and `model` (see `resolve_precision`)."""
    if train.threads:
        torch.set_num_threads(train.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(train.precision, model, train.batch_size)
    return Runtime(device, precision, evaluation.batch_size, train.threads)


def resolve_precision(precision: str, model: torch.nn.Module | None = None, batch_size: int = 16) -> Precision:
    """'auto' -> 'bf16' on a GPU with bf16, or on a CPU with AVX-512 BF16 / AMX where a bf16 matmul
    measured faster than an fp32 one (`bf16_probe`), else 'fp32'.

    The instruction set alone does not say: on one 2-core Xeon with avx512_bf16 a 1024² bf16 matmul
    ran at 135 GFLOP/s against fp32's 242, and Whisper tiny.en trained 1.5x slower under bf16
    autocast, while an AMD EPYC ran bf16 at ~900.

    A `model` that trains convolutions (a conv net fine-tuned in full, in part or with LoRA on its
    convs) is measured itself (`conv_precision_probe`, `batch_size` images at most): a matmul does
    not say how oneDNN's convolutions train. Under bf16 autocast their backward pass was slow on
    every CPU measured (EfficientNet-Lite0, channels-last, 64 px: 1.7x faster in fp32 on a 2-core
    EPYC, 2.2x on a 2-core Xeon with AMX), but that is a measurement, not a rule. A conv net whose
    input size is unknown gets 'fp32'. Where no convolution trains (feature extraction), the
    matmul probe decides: the frozen forward pass ran 2.7x faster in bf16 on the EPYC.
    """
    if precision in ("fp32", "bf16"):
        return precision  # type: ignore[return-value]
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if not _bf16_instructions():
        return "fp32"
    if model is not None and trains_convolutions(model):
        probe = conv_precision_probe(model, batch_size)
        return "fp32" if probe is None else probe["choice"]  # type: ignore[no-any-return]
    return "bf16" if bf16_probe()["bf16_faster"] else "fp32"


def _bf16_instructions() -> bool:
    """Whether this CPU has AVX-512 BF16 or AMX (without them bf16 is emulated, and slow)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_probe() -> dict[str, Any]:
    """Whether bf16 matmuls beat fp32 ones on this CPU, measured once per machine (CPU model, torch
    version and thread count) and kept in `cache_root()/machine.json`: a 1024 x 1024 matmul, 3
    warm-ups then the median of 7, in each dtype; about 0.2 s. bf16 must win by 10% to be chosen
    (its autocast adds casts a bare matmul does not show)."""

    def measure() -> dict[str, Any]:
        rates = {name: _matmul_gflops(dtype) for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
        return {
            "fp32_gflops": round(rates["fp32"], 1),
            "bf16_gflops": round(rates["bf16"], 1),
            "bf16_faster": rates["bf16"] > 1.1 * rates["fp32"],
        }

    return remembered(f"precision|{machine_key()}", measure)


def matmul_gflops(runtime: Runtime) -> float:
    """The matmul rate (GFLOP/s) of the runtime's device in its precision, measured now (a 1024 x
    1024 matmul on a CPU, 4096 x 4096 on a GPU; well under a second), so that a machine busy with
    other work shows as the slower machine it is. `bf16_probe` keeps an idle machine's rates."""
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
    return _matmul_gflops(dtype, 1024 if runtime.device.type == "cpu" else 4096, runtime.device)


def _matmul_gflops(dtype: torch.dtype, n: int = 1024, device: torch.device | None = None) -> float:
    # its own generator: a machine's first run measures this (later ones recall it), and a draw from
    # the global RNG made that run's dropout masks and data order differ from the later runs'
    generator = torch.Generator(device=device or "cpu").manual_seed(0)
    a, b = (torch.randn(n, n, device=device, generator=generator).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(7):
        sync()
        start = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2] / 1e9


def conv_precision_probe(model: torch.nn.Module, batch_size: int) -> dict[str, Any] | None:
    """Whether a conv net trains faster in fp32 or under bf16 autocast on this CPU: the model's own
    forward and backward pass on random images of its `input_size` (the run's batch, at most 16
    images of 64 px and fewer for larger ones), in each precision and, where the model can change
    it, each memory layout (training/kernels.py chooses the layout afterwards); bf16 must win by 10%
    in its best layout. Kept per machine, model and shape in `cache_root()/kernels.json`; about 3 s
    for EfficientNet-Lite0 at 16 x 64 px on a 2-core CPU. The model's weights, batch-norm
    statistics, gradients, layout and mode are as they were afterwards, and so is the global RNG.
    None on a CPU without bf16 instructions or for a model that does not know its input size."""
    size = getattr(model, "input_size", None)
    if not isinstance(size, int) or not _bf16_instructions():
        return None
    rows = max(1, min(batch_size, PROBE_PIXELS // size**2))
    params = sum(p.numel() for p in model.parameters())
    backbone = type(getattr(model, "backbone", model)).__name__
    key = f"conv-precision|{backbone} {params} params|b{rows} s{size}|{machine_key('cpu')}"
    return remembered(key, lambda: _measure_conv_precision(model, rows, size), "kernels.json")


def _measure_conv_precision(model: torch.nn.Module, rows: int, size: int) -> dict[str, Any]:
    pixels = torch.randn(rows, 3, size, size, generator=torch.Generator().manual_seed(0))
    relayout = getattr(model, "use_memory_format", None)
    layouts: dict[str, torch.memory_format | None] = {"as built": None}  # a model that cannot change its layout
    if callable(relayout):
        layouts = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
    started = time.perf_counter()
    measured: dict[str, float] = {}
    with trial_steps(model), torch.random.fork_rng(devices=[]):  # dropout draws leave the run's RNG as it was
        for precision in ("fp32", "bf16"):
            for name, layout in layouts.items():
                if layout is not None:
                    relayout(layout)  # type: ignore[misc]
                measured[f"{precision} {name}"] = _train_step_ms(model, pixels, precision == "bf16")
    best = {p: min(ms for k, ms in measured.items() if k.startswith(p)) for p in ("fp32", "bf16")}
    return {
        "choice": "bf16" if 1.1 * best["bf16"] < best["fp32"] else "fp32",
        "measured_ms": measured,
        "probe_seconds": round(time.perf_counter() - started, 3),
    }


def _train_step_ms(model: torch.nn.Module, pixels: torch.Tensor, bf16: bool) -> float:
    """A forward and backward pass of `model`: the median ms of 3 after a warm-up."""
    times = []
    for _ in range(4):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(pixel_values=pixels)
        out.float().sum().backward()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times[1:]) * 1e3, 2)


@contextmanager
def trial_steps(model: torch.nn.Module) -> Iterator[None]:
    """Training steps of `model` that leave no trace (the probes'): in train mode inside; afterwards
    its memory layout, batch-norm statistics, gradients and mode are as they were before."""
    relayout = getattr(model, "use_memory_format", None)
    was = getattr(model, "memory_format", torch.contiguous_format)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    training = model.training
    model.train()
    try:
        yield
    finally:
        if callable(relayout):
            relayout(was)
        model.train(training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
        for p in model.parameters():
            p.grad = None


def trains_convolutions(model: torch.nn.Module) -> bool:
    """Whether a backward pass runs through a spatial convolution whose weights (or LoRA weights
    beside it) train."""
    has_spatial = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in model.modules())
    return has_spatial and any(
        isinstance(m, torch.nn.Conv2d) and any(p.requires_grad for p in m.parameters(recurse=False))
        for m in model.modules()
    )
