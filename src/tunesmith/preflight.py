"""`tunesmith plan`: a run checked before anything trains.

Given a run's model (built and with its method applied, as `train` builds it) and its encoded data:
the analytic estimate of peak memory and step time (tunesmith.training.estimate), then a dry run:
three real optimizer steps of the one training loop on the configured batches (the longest first)
and one evaluation batch, in a temporary run directory that is removed afterwards. Then both side
by side, the projected time of the whole run, and whether its peak fits in memory, with the config
changes that would lower it when it does not.

How memory is measured: the process's resident memory (RSS) is read before and after the model is
built (what the model holds), and its peak during the dry run is the exact lifetime peak
(`getrusage`) whenever that rose during the dry run, else the highest of samples taken every 5 ms by
a thread. What training costs, which is what the estimate predicts, is the model plus what the dry
run added at its peak; the encoded data and the interpreter are neither, but count in the process's
peak, which is what has to fit in memory. The bytes the forward pass
keeps for the backward pass are measured apart, on the longest micro-batch, with autograd's
saved-tensor hooks, since they are the part of the estimate that depends on the model's shapes.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import math
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import psutil
import torch

from tunesmith.build import checkpointing_unavailable
from tunesmith.config import RunConfig
from tunesmith.eval.evaluate import eval_batches, evaluate_items
from tunesmith.plugins import Method
from tunesmith.runs import open_or_create, peak_rss_mb
from tunesmith.runtime import Runtime, matmul_gflops
from tunesmith.training.batching import epoch_batches
from tunesmith.training.distributed import start_processes
from tunesmith.training.estimate import MB, MemoryEstimate, RowCosts, levers, memory_estimate, peft_sized, row_costs
from tunesmith.training.kernels import choose_kernels, pass_shape
from tunesmith.training.loop import train_loop
from tunesmith.training.shapes import probe_row

__all__ = [
    "CHECKPOINTING_PRESSURE",
    "DRY_RUN_STEPS",
    "Baseline",
    "baseline",
    "check_run",
    "checkpointing_decision",
    "with_model",
]

DRY_RUN_STEPS = 3
CHECKPOINTING_PRESSURE = 0.8  # gradient_checkpointing: auto turns it on above this share of available memory
Items = Sequence[dict[str, Any]]


@dataclass(frozen=True)
class Baseline:
    """The process before its model is built, and what building it added."""

    rss: int  # resident bytes before the model
    available: int  # bytes a run can use: what the machine has available, plus what this process holds
    model: int = 0  # resident bytes the model added


def baseline() -> Baseline:
    """This process's memory now, after importing what the loop imports (so that its code is not
    counted as training memory)."""
    import accelerate  # noqa: F401

    rss = _rss()
    return Baseline(rss, psutil.virtual_memory().available + rss)


@torch.no_grad()
def with_model(start: Baseline, model: torch.nn.Module) -> Baseline:
    """`start` with what `model`, built since, added to the process. Its weights are read once first:
    loaded from safetensors, they are mapped from the file and become resident only when touched
    (which would otherwise happen in the first training step, and count as training)."""
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.sum()
    return replace(start, model=_rss() - start.rss)


def _rss() -> int:
    """This process's resident bytes, after handing memory the allocator holds free back to the
    system (glibc keeps freed heap memory resident, and a model built into it would not show)."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: resident memory as it is
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return int(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class _Data:
    """A run's encoded data and what the plan reads of it."""

    train: Items
    validation: Items | None
    test_rows: int
    lengths: list[int]
    val_lengths: list[int]
    steps: list[list[list[int]]]  # the micro-batches (item indices) of the first steps


def check_run(
    cfg: RunConfig,
    method: Method,
    objective: Any,
    model: torch.nn.Module,
    names: list[str],
    runtime: Runtime,
    items: tuple[Items, Items | None, int],
    plan: dict[str, Any],
    start: Baseline,
    memory_limit_gb: float | None = None,
    dry_run: bool = True,
) -> dict[str, Any]:
    """The plan of a run (see the module's docstring) as plain data.

    Args:
        items: training items, validation items (or None) and the number of test rows.
        plan: the run's plan.json entries (steps, precision, parameter counts).
        start: the process before the model was built.
        memory_limit_gb: the memory the run may use (default: what this machine has available).
        dry_run: measure three steps (False: the estimate alone).
    """
    lengths = [objective.length(it) for it in items[0]]
    val_lengths = [objective.length(it) for it in items[1] or []]
    data = _Data(items[0], items[1], items[2], lengths, val_lengths, _first_steps(lengths, cfg, DRY_RUN_STEPS))
    # the kernels training will use (measured on this machine, or recalled), before anything is traced
    kernels = choose_kernels(model, *pass_shape(objective, items[0], cfg.train.batch_size), runtime)
    with tempfile.TemporaryDirectory(prefix="tunesmith-plan-") as tmp:
        checkpointing = cfg.train.gradient_checkpointing is True
        costs, cached = _row_costs(cfg, method, objective, model, names, runtime, data, Path(tmp), checkpointing)
        est = _estimate(cfg, model, names, runtime, data, costs, cached, start)
        measured = None
        if dry_run and est.process_peak <= start.available:  # else the dry run might not survive
            measured = _dry_run(cfg, method, objective, model, names, runtime, data, start, Path(tmp))
    steps = plan["total_steps"]
    report = {
        "parameters": {"total": plan["total_parameters"], "trainable": plan["trainable_parameters"]},
        "steps": steps,
        "precision": runtime.precision,
        "kernels": {name: entry["choice"] for name, entry in kernels.items()},
        "estimate": est.report,
        "measured": measured,
        "error": _errors(est.report, measured, costs, data, checkpointing),
        "projected": _projection(cfg, steps, data, est.report, measured, costs, est.rate),
    }
    limit = int(memory_limit_gb * 2**30) if memory_limit_gb is not None else start.available
    needed = max(est.process_peak, int((measured or {}).get("peak_rss_mb", 0) * MB))
    report["memory"] = {
        "besides_training_mb": round(est.held / MB, 1),
        "available_mb": round(start.available / MB, 1),
        "limit_mb": round(limit / MB, 1),
        "needed_mb": round(needed / MB, 1),
        "fits": needed <= limit,
    }
    if needed > limit:
        report["levers"] = _levers(cfg, method, model, plan, est, costs)
    if dry_run and measured is None:
        report["dry_run_skipped"] = "the estimated peak is more than this machine has available"
    return report


def checkpointing_decision(
    cfg: RunConfig,
    method: Method,
    objective: Any,
    model: torch.nn.Module,
    names: list[str],
    runtime: Runtime,
    train: Items,
) -> dict[str, Any]:
    """`train.gradient_checkpointing: auto` decided for this run, before it trains: on when the
    estimated peak (`tunesmith plan`'s analytic estimate at the micro-batch with the most
    activations, plus what the process holds besides training) is above `CHECKPOINTING_PRESSURE`
    of the memory available now, on the run's device, and the model and method allow it.

    The probe runs one forward pass of two rows' shapes (the longest row of the first batch and one
    about half as long), without gradients and leaving the random state as it was: well under a
    second for a 135M-parameter model at 512 tokens. Returns what plan.json records: `on`, the
    reason, and the numbers it was decided on.
    """
    unavailable = checkpointing_unavailable(model, method)
    if unavailable is None and method.frozen_backbone:  # nothing below the head keeps activations
        unavailable = "the backbone is frozen: no block keeps activations to recompute"
    if unavailable is None and getattr(objective, "samples_while_training", False):
        unavailable = "batches are sampled as the run trains: no batch to estimate beforehand"
    if unavailable is not None:
        return {"setting": "auto", "on": False, "reason": unavailable}
    lengths = [objective.length(it) for it in train]
    data = _Data(train, None, 0, lengths, [], _first_steps(lengths, cfg, 1))
    devices = [runtime.device.index or 0] if runtime.device.type == "cuda" else []
    with tempfile.TemporaryDirectory(prefix="tunesmith-plan-") as tmp, torch.random.fork_rng(devices=devices):
        costs, _ = _row_costs(cfg, method, objective, model, names, runtime, data, Path(tmp), False, times=False)
    rows, length = _peak_batch(data, cfg, costs)
    memory = memory_estimate(model, names, runtime.precision, costs, rows, length)
    held, available = _memory_room(model, runtime)
    needed = held + memory.total
    saved = rows * (costs.at(costs.activations, length) - costs.at(costs.checkpointed_activations, length))
    on = costs.checkpointable and needed > CHECKPOINTING_PRESSURE * available
    if not costs.checkpointable:
        reason = "no block on the gradient path can be checkpointed"
    elif on:
        reason = f"the estimated peak is above {CHECKPOINTING_PRESSURE:.0%} of the memory available"
    else:
        reason = f"the estimated peak fits in {CHECKPOINTING_PRESSURE:.0%} of the memory available"
    return {
        "setting": "auto",
        "on": on,
        "reason": reason,
        "device": runtime.device.type,
        "batch": {"rows": rows, "length": length},
        "estimated_peak_mb": round(needed / MB, 1),
        "estimated_peak_checkpointed_mb": round((needed - max(0.0, saved)) / MB, 1),
        "available_mb": round(available / MB, 1),
    }


def _memory_room(model: torch.nn.Module, runtime: Runtime) -> tuple[int, int]:
    """(bytes the process holds besides training, bytes a run can use) on the run's device: on a GPU
    its free memory plus what this process allocated (the weights, counted in the estimate); on the
    CPU the machine's available memory plus this process's resident memory, of which all but the
    weights is held besides training (interpreter, libraries, data)."""
    if runtime.device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(runtime.device)
        return 0, free + torch.cuda.memory_allocated(runtime.device)
    rss = _rss()
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return max(0, rss - weights), psutil.virtual_memory().available + rss


@dataclass(frozen=True)
class _Estimated:
    memory: MemoryEstimate
    rows: int  # of the micro-batch with the most activations
    length: int  # of its longest row
    rate: float  # matmul FLOP/s
    held: int  # bytes the process holds besides training (interpreter, libraries, data)
    report: dict[str, Any]

    @property
    def process_peak(self) -> int:
        return self.held + self.memory.total


def _estimate(cfg, model, names, runtime: Runtime, data: _Data, costs: RowCosts, cached: bool, start) -> _Estimated:
    """The estimate of peak memory (at the micro-batch with the most activations) and step time (of
    the dry run's steps after the first, at the matmul rate measured now)."""
    rows, length = _peak_batch(data, cfg, costs)
    memory = memory_estimate(model, names, runtime.precision, costs, rows, length)
    rate = matmul_gflops(runtime) * 1e9
    held = _rss() - start.model
    report = {
        "memory_mb": memory.as_mb() | {"process_peak": round((held + memory.total) / MB, 1)},
        "batch": {"rows": rows, "length": length},
        "matmul_gflops": round(rate / 1e9, 1),
        "step_seconds": round(_steps_flops(costs, data, data.steps[1:]) / rate, 4),
        "frozen_work_cached": cached,
    }
    return _Estimated(memory, rows, length, rate, held, report)


def _levers(cfg: RunConfig, method: Method, model, plan: dict, est: _Estimated, costs: RowCosts) -> list[dict]:
    found = levers(
        est.memory,
        costs,
        rows=est.rows,
        length=est.length,
        batch_size=cfg.train.batch_size,
        grad_accum=cfg.train.grad_accum,
        checkpointing=cfg.train.gradient_checkpointing is True,
        checkpointing_refused=method.checkpointing_refusal is not None,
        trainable=plan["trainable_parameters"],
        peft_trainable=peft_sized(model),
    )
    return [asdict(lever) for lever in found]


def _first_steps(lengths: list[int], cfg: RunConfig, n: int) -> list[list[list[int]]]:
    """The micro-batches of the loop's first `n` optimizer steps (epochs in the loop's order)."""
    steps: list[list[list[int]]] = []
    epoch = 0
    while len(steps) < n:
        batches = epoch_batches(lengths, cfg.train.batch_size, cfg.train.seed, epoch, cfg.train.group_by_length)
        accum = cfg.train.grad_accum
        steps += [batches[i : i + accum] for i in range(0, len(batches), accum)]
        epoch += 1
    return steps[:n]


def _row_costs(
    cfg, method, objective, model, names, runtime, data: _Data, tmp: Path, checkpointing: bool, times: bool = True
) -> tuple[RowCosts, bool]:
    """Per-row costs from probes of the longest row of the first micro-batch and of a row about half
    as long; whether the objective caches the frozen work before the first trained layer (tried on
    one row, since it changes the FLOPs; without `times`, for memory alone, not tried)."""
    first = data.steps[0][0]
    longest = max(first, key=lambda i: data.lengths[i])
    half = data.lengths[longest] // 2
    shorter = min(range(len(data.lengths)), key=lambda i: abs(data.lengths[i] - half))
    probes = [_probe(model, objective, runtime, data.train[i], data.lengths[i]) for i in (longest, shorter)]
    short = probes[1] if data.lengths[shorter] < data.lengths[longest] else None
    cached = False
    if times and (method.frozen_backbone or method.frozen_blocks > 0):
        k = None if method.frozen_backbone else method.frozen_blocks
        item = data.train[longest]
        cached = objective.cache_frozen(model, [item], k, runtime, 2**30, tmp / "probe-cache", "probe")[0] is not item
    return row_costs(probes[0], short, cached, checkpointing), cached


def _probe(model, objective, runtime: Runtime, item: dict[str, Any], length: int):
    batch = {k: v.to(runtime.device) for k, v in objective.collate([item]).items()}
    return probe_row(model, objective.model_inputs(batch), runtime.autocast, length)


def _peak_batch(data: _Data, cfg: RunConfig, costs: RowCosts) -> tuple[int, int]:
    """(rows, length) of the micro-batch with the most activations (the longest, where batches are
    grouped by length), among the first epoch's."""
    train = cfg.train
    batches = epoch_batches(data.lengths, train.batch_size, train.seed, 0, train.group_by_length)
    shapes = {(len(b), max(data.lengths[i] for i in b)) for b in batches}
    return max(shapes, key=lambda s: s[0] * costs.at(costs.activations, s[1]))


def _steps_flops(costs: RowCosts, data: _Data, steps: list[list[list[int]]]) -> float:
    """Mean FLOPs of these steps (each a list of micro-batches; rows padded to the batch's longest)."""
    flops = [_batch_cost(costs, [data.lengths[i] for i in b], costs.flops) for step in steps for b in step]
    return sum(flops) / max(1, len(steps))


def _batch_cost(costs: RowCosts, lengths: list[int], pair: tuple[float, float]) -> float:
    """A per-row cost (`pair`, a field of `costs`) of a batch padded to its longest row."""
    return len(lengths) * costs.at(pair, max(lengths)) if lengths else 0.0


def _dry_run(cfg, method, objective, model, names, runtime, data: _Data, start: Baseline, tmp: Path) -> dict:
    """Three optimizer steps of the real loop and one evaluation batch: peak memory and times."""
    dry = cfg.train.model_copy(
        update={"max_steps": DRY_RUN_STEPS, "eval_every": None, "save_every": 10**9, "early_stopping": None}
    )
    run = open_or_create(tmp, "plan", cfg.to_dict(), None)
    marks: list[float] = []
    with _PeakRss() as peak:
        marks.append(time.perf_counter())
        train_loop(
            model=model,
            method=method,
            objective=objective,
            train_items=data.train,
            val_items=None,
            cfg=dry,
            eval_cfg=cfg.eval,
            run=run,
            names=names,
            fingerprint={},
            runtime=runtime,
            processes=start_processes(runtime.device.type == "cpu", None),
            callbacks=[lambda step, record: marks.append(time.perf_counter())],
        )
        eval_seconds = _time_eval_batch(model, objective, runtime, data.validation)
    steps = [b - a for a, b in itertools.pairwise(marks)]
    longest = [data.train[i] for i in data.steps[0][0]]
    return {
        "model_mb": round(start.model / MB, 1),
        "peak_rss_mb": round(peak.bytes / MB, 1),
        # the model, and what the dry run added to the process at its peak (the encoded data is neither)
        "training_mb": round((start.model + peak.bytes - peak.start) / MB, 1),
        "activations_mb": round(_saved_bytes(model, objective, runtime, longest) / MB, 3),
        "first_step_seconds": round(steps[0], 3),  # with the loop's start-up, warm-up and caching
        "step_seconds": round(sum(steps[1:]) / max(1, len(steps) - 1), 4),
        "steps_seconds": [round(s, 4) for s in steps],
        "eval_batch_seconds": eval_seconds,
    }


def _time_eval_batch(model, objective, runtime: Runtime, items: Items | None) -> float | None:
    """Seconds of the longest evaluation batch (None without validation data)."""
    if not items:
        return None
    first = eval_batches([objective.length(it) for it in items], runtime.eval_batch_size)[0]
    started = time.perf_counter()
    evaluate_items(model, objective, [items[i] for i in first], runtime)
    return round(time.perf_counter() - started, 4)


def _saved_bytes(model, objective, runtime: Runtime, items: Items) -> int:
    """Bytes the forward pass and loss of one micro-batch keep for the backward pass: every tensor
    autograd saves, each storage once, the parameters left out (they are weights, not activations)."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    batch = {k: v.to(runtime.device) for k, v in objective.collate(items).items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), runtime.autocast():
        objective.loss(model(**objective.model_inputs(batch)), batch)
    return sum(kept.values())


class _PeakRss:
    """The highest resident memory of this process while inside (see the module's docstring)."""

    def __enter__(self) -> _PeakRss:
        self._process = psutil.Process()
        self._lifetime = peak_rss_mb()
        self.start = self.bytes = _rss()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.005):
            self.bytes = max(self.bytes, self._process.memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        lifetime = peak_rss_mb()
        if lifetime > self._lifetime:  # the lifetime peak was reached inside: exact
            self.bytes = int(lifetime * MB)


def _errors(estimate: dict, measured: dict | None, costs: RowCosts, data: _Data, checkpointing: bool) -> dict | None:
    """Estimate / measurement (two significant digits): above 1 the estimate is high, below 1 low.
    No ratio for activations under gradient checkpointing: the saved-tensor hooks do not see inside
    a checkpointed block, whose activations exist only while it is recomputed."""
    if measured is None:
        return None
    first = data.steps[0][0]
    act = _batch_cost(costs, [data.lengths[i] for i in first], costs.activations) / MB
    ratios = {
        "memory": estimate["memory_mb"]["total"] / measured["training_mb"],
        "activations": act / measured["activations_mb"] if measured["activations_mb"] else math.nan,
        "step_time": estimate["step_seconds"] / measured["step_seconds"],
    }
    if checkpointing:
        del ratios["activations"]
    return {k: float(f"{v:.2g}") for k, v in ratios.items() if math.isfinite(v)}


def _projection(cfg, steps: int, data: _Data, estimate: dict, measured: dict | None, costs, rate) -> dict:
    """The whole run's time: its steps at the measured step time (the first step's extra once),
    and its passes over the validation and test data, each evaluation batch scaled by its tokens
    from the measured one (from the estimate where nothing was measured). Not counted: generated
    answers (exact match, samples) and retention measurements."""
    passes = _eval_passes(cfg, steps, data)
    batches = [[data.val_lengths[i] for i in b] for b in eval_batches(data.val_lengths, cfg.eval.batch_size)]
    if measured is not None:
        train = measured["first_step_seconds"] + (steps - 1) * measured["step_seconds"]
        work = [len(b) * max(b) for b in batches]
        one_pass = (measured["eval_batch_seconds"] or 0.0) * sum(work) / work[0] if work else 0.0
    else:
        cached = estimate["frozen_work_cached"]  # the frozen work runs once, over every row
        once = sum(costs.at(costs.frozen_flops, n) for n in data.lengths + data.val_lengths) if cached else 0.0
        train = steps * estimate["step_seconds"] + once / rate
        one_pass = sum(_batch_cost(costs, b, costs.forward_flops) for b in batches) / rate
    return {
        "basis": "measured" if measured is not None else "estimated",
        "train_seconds": round(train, 1),
        "evaluation_passes": passes,
        "evaluation_seconds": round(passes * one_pass, 1),
        "total_seconds": round(train + passes * one_pass, 1),
    }


def _eval_passes(cfg: RunConfig, steps: int, data: _Data) -> float:
    """Passes over the validation data (a test pass counted in validation passes by its rows)."""
    if not data.validation:
        return 0.0
    per_epoch = math.ceil(math.ceil(len(data.train) / cfg.train.batch_size) / cfg.train.grad_accum)
    during = steps // cfg.train.eval_every if cfg.train.eval_every else steps // per_epoch
    after = (1 + data.test_rows / len(data.validation)) * (2 if cfg.eval.baseline else 1)
    return round(during + after, 2)
