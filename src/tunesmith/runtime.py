"""Where and how tensors are computed: one `Runtime` per command, built once and passed down.

It holds the device, the precision (bf16 autocast with fp32 master weights, or fp32), the CPU
threads and the evaluation batch size; nothing else decides where tensors live or which autocast
applies.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from tunesmith.config import EvalConfig, TrainConfig

__all__ = ["Runtime", "make_runtime", "resolve_precision", "trains_convolutions"]

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
    """'auto' -> 'bf16' on a GPU with bf16 or a CPU with AVX-512 BF16 / AMX, else 'fp32'.

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
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def trains_convolutions(model: torch.nn.Module) -> bool:
    """Whether a backward pass runs through a spatial convolution whose weights (or LoRA weights
    beside it) train."""
    has_spatial = any(isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in model.modules())
    return has_spatial and any(
        isinstance(m, torch.nn.Conv2d) and any(p.requires_grad for p in m.parameters(recurse=False))
        for m in model.modules()
    )
