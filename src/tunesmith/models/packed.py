"""Decoding with linear weights laid out for the CPU matmul library, where that is measured faster.

A decoding step multiplies a few rows (one token per sequence) by every weight of the model, so it
is bound by reading the weights, not by arithmetic. oneDNN can reorder a weight once into the
blocked layout its kernels read best (`mkldnn._reorder_linear_weight`, what torch's compiler uses
when it freezes a CPU model). On a 2-core Xeon a 16-row matmul through SmolLM2's widest block
linear then ran ~20% faster with the weights out of cache (1.3-3x with them in cache). Nothing here
is written by hand but the swap: the reorder and the matmul are torch's own oneDNN ops.

Whether it wins depends on the CPU and the row count, so it is measured: one of the model's own
weight shapes, plain against reordered, at the decoding batch's row count, kept per machine
(`cache_root()/kernels.json`), with the cost of reordering it: a generation of few tokens (a chat
turn's first words, an evaluation's short answers) is not worth reordering for.

The reordered copies live only while `packed_linears` is open and cost one extra copy of the
weights; gradients never flow through them (training uses the plain weights), and bf16 autocast or
any other dtype falls back to the plain path.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.machine import machine_key, remembered

__all__ = ["LINEAR_KERNELS", "fastest_linear", "linear_timings", "packed_linears", "packing_wins"]

MIN_WIDTH = 64  # narrower linears (LoRA's low-rank matrices) stay as they are: too small to gain


def _available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def packing_wins(model: nn.Module, rows: int) -> dict[str, Any]:
    """Whether reordered weights beat plain ones for `rows`-row matmuls with the model's widest
    block linear, measured once per machine and shape (about 0.1 s)."""
    weights = [m.weight for m in _packable_linears(model)]
    if not weights or not _available():
        return {"choice": "plain", "reason": "no fp32 CPU linear or no oneDNN"}
    weight = max(weights, key=lambda w: w.numel() if w.shape[0] < 8192 else 0)  # a block's, not the output layer's
    key = f"decode-linear|rows {rows}|{tuple(weight.shape)}|{machine_key('cpu')}"
    return remembered(key, lambda: _measure(weight.detach(), rows), "kernels.json")


def _measure(weight: torch.Tensor, rows: int) -> dict[str, Any]:
    """Plain against reordered over copies of `weight` that together outgrow the CPU's caches (as a
    model's weights do: each is read once a step), and the cost of reordering one."""
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
    copies = [weight.clone() for _ in range(max(2, min(32, (64 << 20) // (weight.numel() * 4))))]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in copies]

    def median_ms(fn: Any, n: int) -> float:
        fn(0)
        times = []
        for i in range(n):
            start = time.perf_counter()
            fn(i % len(copies))
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e3

    n = 4 * len(copies)
    plain = median_ms(lambda i: F.linear(x, copies[i]), n)
    reordered = median_ms(lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""), n)
    reorder = median_ms(lambda i: torch.ops.mkldnn._reorder_linear_weight(copies[i], rows), len(copies))
    return {
        "choice": "packed" if reordered < 0.9 * plain else "plain",
        # the reorder pays for itself after this many steps (each weight is reordered once per generation)
        "break_even_steps": math.ceil(reorder / (plain - reordered)) if reordered < plain else None,
        "measured": {"plain_ms": round(plain, 4), "packed_ms": round(reordered, 4), "reorder_ms": round(reorder, 4)},
    }


LINEAR_KERNELS = ("plain", "packed", "weights-first")


def linear_timings(weight: torch.Tensor, rows: int) -> dict[str, float]:
    """Milliseconds of one `rows`-row matmul by `weight` (out, in) with each of `LINEAR_KERNELS`,
    and of reordering it, measured once per machine, shape, dtype (fp32 or bf16, inputs in the
    weight's dtype) and power of two of rows, over copies that outgrow the caches (0.1-0.5 s a shape;
    SmolLM2's five shapes took 0.8-1.2 s on a 2-core Xeon).

    plain: `F.linear` (x @ W.T); packed: oneDNN's reordered weight; weights-first: W @ x.T, which
    walks the weight row by row (on a 2-core Xeon, 2.2x faster than plain for SmolLM2's
    down-projection, 1536 wide, and no faster for the others).
    """
    bucket = 1 << (rows - 1).bit_length()  # rows rounded up to a power of two: 3 rows run as 4 do
    dtype = "" if weight.dtype == torch.float32 else f"|{str(weight.dtype).removeprefix('torch.')}"
    key = f"decode-linear-kernels|rows {bucket}|{tuple(weight.shape)}{dtype}|{machine_key('cpu')}"
    return remembered(key, lambda: _time_kernels(weight.detach(), bucket), "kernels.json")  # type: ignore[no-any-return]


def fastest_linear(weight: torch.Tensor, rows: int, steps: int) -> str:
    """The kernel of `LINEAR_KERNELS` that takes least time over `steps` matmuls, the reorder included."""
    if (
        weight.device.type != "cpu"
        or weight.dtype not in (torch.float32, torch.bfloat16)
        or min(weight.shape) < MIN_WIDTH
        or not _available()
        or (weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported())
    ):
        return "plain"
    ms = linear_timings(weight, rows)
    total = {"plain": steps * ms["plain"], "weights-first": steps * ms["weights-first"]}
    total["packed"] = ms["reorder"] + steps * ms["packed"]
    return min(LINEAR_KERNELS, key=lambda kernel: total[kernel])


def _time_kernels(weight: torch.Tensor, rows: int) -> dict[str, float]:
    x = torch.randn(rows, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(weight.dtype)
    x_t = x.t().contiguous()
    copies = [weight.clone() for _ in range(max(2, min(32, (64 << 20) // (weight.numel() * weight.element_size()))))]
    start = time.perf_counter()
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, rows) for w in copies]
    reorder = (time.perf_counter() - start) * 1e3 / len(copies)
    kernels = {
        "plain": lambda i: F.linear(x, copies[i]),
        "packed": lambda i: torch.ops.mkldnn._linear_pointwise(x, packed[i], None, "none", [], ""),
        "weights-first": lambda i: torch.mm(copies[i], x_t).t().contiguous(),
    }
    timings = {name: [] for name in kernels}  # type: dict[str, list[float]]
    for round_ in range(4):  # interleaved, so a slow moment of the machine is shared by all three
        for name, fn in kernels.items():
            fn(0)
            for i in range(len(copies)):
                begin = time.perf_counter()
                fn((i + round_) % len(copies))
                timings[name].append(time.perf_counter() - begin)
    measured = {name: round(statistics.median(t) * 1e3, 4) for name, t in timings.items()}
    return {**measured, "reorder": round(reorder, 4)}


@contextmanager
def packed_linears(model: nn.Module, rows: int, steps: int) -> Iterator[bool]:
    """While open, the fp32 CPU linears of `model` (its output layer too) run `rows`-row inputs
    without gradients through reordered weights, where `packing_wins` says so and up to `steps`
    decoding steps are enough to repay the reordering twice over; yields whether they do."""
    if torch.is_autocast_enabled("cpu"):
        yield False
        return
    wins = packing_wins(model, rows)
    if wins["choice"] != "packed" or steps < 2 * (wins.get("break_even_steps") or 0):
        yield False
        return
    swapped = []
    try:
        for module in _packable_linears(model):
            packed = torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), rows)
            module.forward = _PackedForward(module, packed, rows)  # type: ignore[method-assign,assignment]
            swapped.append(module)
        yield True
    finally:
        for module in swapped:
            del module.forward


def _packable_linears(model: nn.Module) -> list[nn.Linear]:
    return [
        m
        for m in model.modules()
        if type(m) is nn.Linear
        and m.weight.device.type == "cpu"
        and m.weight.dtype == torch.float32
        and min(m.weight.shape) >= MIN_WIDTH
    ]


class _PackedForward:
    """`nn.Linear.forward` through a reordered weight for `rows`-row inputs without gradients."""

    def __init__(self, module: nn.Linear, packed: torch.Tensor, rows: int) -> None:
        self.module, self.packed, self.rows = module, packed, rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if x.dtype != torch.float32 or torch.is_grad_enabled() or x.numel() != self.rows * x.shape[-1]:
            return F.linear(x, m.weight, m.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, m.bias, "none", [], "")  # type: ignore[no-any-return]
