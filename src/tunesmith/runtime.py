"""Where and how tensors are computed: one `Runtime` per command, built once and passed down.

It holds the device, the precision (bf16 autocast with fp32 master weights, or fp32), the CPU
threads and the evaluation batch size; nothing else decides where tensors live or which autocast
applies.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tunesmith.config import EvalConfig, TrainConfig
from tunesmith.machine import machine_key, remembered

__all__ = ["Runtime", "bf16_probe", "make_runtime", "matmul_gflops", "resolve_precision", "trains_convolutions"]

Precision = Literal["fp32", "bf16"]


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
    precision = resolve_precision(train.precision, model)
    return Runtime(device, precision, evaluation.batch_size, train.threads)


def resolve_precision(precision: str, model: torch.nn.Module | None = None) -> Precision:
    """'auto' -> 'bf16' on a GPU with bf16, or on a CPU with AVX-512 BF16 / AMX where a bf16 matmul
    measured faster than an fp32 one (`bf16_probe`), else 'fp32'.

    The instruction set alone does not say: on one 2-core Xeon with avx512_bf16 a 1024² bf16 matmul
    ran at 135 GFLOP/s against fp32's 242, and Whisper tiny.en trained 1.5x slower under bf16
    autocast, while an AMD EPYC ran bf16 at ~900.

    On a CPU, 'auto' gives 'fp32' for a `model` that trains convolutions (a conv net fine-tuned in
    full, in part or with LoRA on its convs): under bf16 autocast the backward pass of oneDNN's
    convolutions was slow, and an EfficientNet-Lite0 step ran 1.7x faster in fp32 (channels-last,
    64 px: 339 vs 202 images/s). Where no convolution trains (feature extraction), bf16 stays: the
    frozen forward pass ran 2.7x faster in it.
    """
    if precision in ("fp32", "bf16"):
        return precision  # type: ignore[return-value]
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if model is not None and trains_convolutions(model):
        return "fp32"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    if "avx512_bf16" not in flags and "amx_bf16" not in flags:
        return "fp32"
    return "bf16" if bf16_probe()["bf16_faster"] else "fp32"


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
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
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


def trains_convolutions(model: torch.nn.Module) -> bool:
    """Whether a backward pass runs through a spatial convolution whose weights (or LoRA weights
    beside it) train."""
    has_spatial = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in model.modules())
    return has_spatial and any(
        isinstance(m, torch.nn.Conv2d) and any(p.requires_grad for p in m.parameters(recurse=False))
        for m in model.modules()
    )
