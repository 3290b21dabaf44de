"""The one training loop (DESIGN §7), on accelerate.

Reads top to bottom: take the device and precision from the command's `Runtime` (and the processes
of a multi-process run from `Processes`: see training/distributed.py), cache frozen
work, build the optimizer and schedule, optionally restore a checkpoint, then step through epochs
of length-grouped batches with gradient accumulation, clipping, periodic validation, early stopping
and atomic checkpoints. The loop knows no task and no method: it talks to the objective and the
method through their protocols (tunesmith.plugins), and what it needs of them is a field there.
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from tunesmith.config import EvalConfig, TrainConfig
from tunesmith.errors import ConfigError
from tunesmith.eval.evaluate import evaluate_items
from tunesmith.eval.metrics import higher_is_better
from tunesmith.runs import Run, memory_now, read_json
from tunesmith.runtime import Runtime
from tunesmith.training.batching import epoch_batches, total_steps
from tunesmith.training.checkpoint import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, save_tensors
from tunesmith.training.distributed import Processes, rank_share
from tunesmith.training.kernels import choose_kernels, pass_shape
from tunesmith.training.lr_find import choose_lr, range_test, step_batches
from tunesmith.training.memory import own_weights, release_free_memory, trim_between_blocks
from tunesmith.training.optim import adamw
from tunesmith.training.rates import Rates, head_lr_for, resolve_rates
from tunesmith.training.schedules import schedule

__all__ = ["LoopResult", "StepCallback", "frozen_linears", "frozen_matmuls_to_bf16", "train_loop"]

StepCallback = Callable[[int, dict[str, Any]], None]


@dataclass
class LoopResult:
    steps: int
    train_seconds: float
    samples: int
    tokens: int
    best: dict[str, Any] | None = None
    stopped_early: bool = False
    skipped_steps: int = 0  # optimizer steps left out because a loss was not finite
    evals: list[dict[str, Any]] = field(default_factory=list)
    retention: list[dict[str, Any]] = field(default_factory=list)


def frozen_matmuls_to_bf16(model: torch.nn.Module, trained: set[str]) -> int:
    """Store the weights of linear layers that never train in bf16; returns how many were cast.

    Autocast casts a weight to bf16 each time it is used, and caches the cast only for weights that
    require gradients: a frozen weight was cast again in every forward and backward pass (11% of a
    SmolLM2 LoRA step). Frozen work done once: cast it once. The values are exactly what autocast
    would have used. Weights shared with an embedding (tied output layers) stay fp32, since the
    embedding lookup feeds the fp32 residual stream, and so do norms and biases (small, cast as before).
    """
    frozen = frozen_linears(model, trained)
    for linear in frozen:
        linear.weight.data = linear.weight.data.to(torch.bfloat16)
    if frozen:  # the fp32 originals go only if nothing else keeps the checkpoint file mapped
        own_weights(model)
    for module in model.modules():
        # peft casts a LoRA layer's input to its fp32 weights' dtype, and autocast casts it back for
        # the matmul: two copies of the activations per adapted layer, for nothing.
        if hasattr(module, "cast_input_dtype_enabled"):
            setattr(module, "cast_input_dtype_enabled", False)  # noqa: B010 (an attribute of peft's layers)
    return len(frozen)


def frozen_linears(model: torch.nn.Module, trained: set[str]) -> list[torch.nn.Linear]:
    """The linear layers whose weights never train and are not shared with an embedding: those
    `frozen_matmuls_to_bf16` stores in bf16."""
    embedded = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    trained_ids = {id(p) for name, p in model.named_parameters() if name in trained}
    return [
        module
        for module in model.modules()
        if isinstance(module, torch.nn.Linear)
        and id(module.weight) not in embedded
        and not any(id(p) in trained_ids or p.requires_grad for p in module.parameters(recurse=False))
    ]


def train_loop(
    *,
    model: Any,
    method: Any,
    objective: Any,
    train_items: Sequence[dict[str, Any]],
    val_items: Sequence[dict[str, Any]] | None,
    cfg: TrainConfig,
    eval_cfg: EvalConfig,
    run: Run,
    names: list[str],
    fingerprint: dict[str, str],
    runtime: Runtime,
    processes: Processes,
    resume: bool = False,
    callbacks: Sequence[StepCallback] = (),
    retention: Any = None,
    kernels: dict[str, Any] | None = None,
) -> LoopResult:
    # torch imports these on first use, inside the loop (accelerate's prepare_model checks for
    # DTensors; the optimizer's constructor imports dynamo): ~1 s the first time, before the clock starts
    import torch._dynamo
    import torch.distributed.tensor

    device = runtime.device
    world, main = processes.world, processes.main
    log = run.log if main else _discard  # only rank 0 writes the run directory
    model.to(device)
    trimming = trim_between_blocks(model, cfg.trim_memory_every, device)  # hooks, removed when the loop ends
    lengths = [objective.length(it) for it in train_items]
    # Attention and dropout kernels measured on this machine at this run's shapes (or, resuming, as recorded).
    if kernels is None:  # else chosen and applied by the caller (api: before the task prepares its items)
        recorded = run.plan().get("kernels") if resume and main else None
        row_lengths, rows = pass_shape(objective, train_items, cfg.batch_size)
        kernels = choose_kernels(model, row_lengths, rows, runtime, processes.broadcast(recorded), processes.broadcast)
    if main:
        run.update_plan({"kernels": kernels})
    started = time.perf_counter()

    # Frozen work done once: what runs before the first trainable weight is computed a single time.
    if method.frozen_backbone or method.frozen_blocks > 0:
        spill = run.dir / "cache" if main else Path(tempfile.mkdtemp(prefix="tunesmith-cache-"))
        train_items, val_items = _cache(model, method, objective, train_items, val_items, cfg, runtime, spill)
    if runtime.precision == "bf16" and not processes.sharded:  # (FSDP shards hold one dtype)
        # After caching: the cache checks its split against an fp32 forward, which needs fp32 weights.
        frozen_matmuls_to_bf16(model, set(names))

    accum = cfg.grad_accum * world  # micro-batches of one optimizer step, over all processes
    steps = total_steps(len(train_items), cfg.batch_size, accum, cfg.epochs, cfg.max_steps)
    rates = _rates(model, method, objective, train_items, lengths, cfg, runtime, run, names, resume, processes)
    # `net` is what trains: DDP's wrapper where there are several processes, else the model itself
    # (sharded in place under FSDP, before the optimizer sees its parameters); `model` is what
    # evaluation and checkpoints read.
    net = processes.wrap(model)
    optimizer, scheduler = _optimizer(model, method, cfg, rates, steps)

    state: dict[str, Any] = {"epoch": 0, "batch": 0, "best": None, "bad_evals": 0, "processes": world, **fingerprint}
    if resume:
        state = _restore(run, model, names, optimizer, scheduler, fingerprint, processes)
    elif world > 1:
        torch.manual_seed(cfg.seed + 7919 * processes.rank)  # each process its own dropout masks
    step = int(state.get("step", 0))
    result = LoopResult(steps=step, train_seconds=0.0, samples=0, tokens=0, best=state["best"])
    if retention is not None and processes.evaluates:
        _retention_baseline(retention, state, model, runtime, log, result)
    watch = (cfg.early_stopping.metric if cfg.early_stopping else None) or eval_cfg.metric or objective.default_metric
    bar = tqdm(
        total=steps, initial=step, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True, disable=not main
    )
    paused = 0.0  # seconds spent validating or checkpointing, left out of the throughput
    running: list[float] = []
    postfix: dict[str, str] = {}  # the progress bar shows the latest loss and validation metric
    model.train()

    while step < steps and not result.stopped_early:
        epoch = state["epoch"]
        method.on_epoch_start(model, epoch)
        batches = epoch_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_by_length)
        b = state["batch"]
        while b < len(batches) and step < steps:
            group = batches[b : b + accum]  # micro-batches of one optimizer step
            share = rank_share(group, processes.rank, world)
            finite = True
            for j, (ids, counts) in enumerate(share):
                # Gradients are averaged over the processes once, after this process's last micro-batch.
                with processes.sync(net, last=j == len(share) - 1):
                    # x world: data parallelism averages gradients, a single process sums them.
                    loss = _batch_loss(net, objective, train_items, ids, runtime, len(group) / world)
                    if counts:
                        result.samples += len(ids)
                        result.tokens += sum(lengths[i] for i in ids)
                        # never let a NaN reach the weights: the whole step is skipped (on every process)
                        finite = finite and bool(torch.isfinite(loss))
                        running.append(float(loss.detach()) * len(group) / world)
                    else:
                        loss = loss * 0.0  # a stand-in that keeps the processes in step
                    loss.backward()
                    del loss  # its graph, and whatever its nodes hold, goes before the next forward pass
            if processes.all(finite):
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
            else:
                result.skipped_steps += 1
                log({"kind": "skipped_step", "step": step + 1, "reason": "non-finite loss"})
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, b = step + 1, b + len(group)
            state.update(step=step, epoch=epoch, batch=b)

            record: dict[str, Any] = {"step": step, "epoch": round(epoch + b / len(batches), 4)}
            if step % cfg.log_every == 0 or step == steps:
                total, count = processes.sum([sum(running), len(running)])  # the mean over every process
                stats = _mean_stats(processes, objective.step_stats())  # e.g. rl: mean reward, KL
                running.clear()
                if count:
                    record.update(loss=total / count, lr=scheduler.get_last_lr()[0], **stats, **memory_now())
                    log({"kind": "train", **record})
            epoch_end = b >= len(batches)
            due_eval = val_items is not None and (
                (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and epoch_end)
            )
            t0 = time.perf_counter()
            if due_eval:
                assert val_items is not None
                metrics = None
                if processes.evaluates:  # rank 0 (with FSDP: every process; rank 0 judges)
                    metrics = _evaluate(model, objective, val_items, runtime, retention, eval_cfg)
                if main:
                    assert metrics is not None
                    _judge(metrics, record["epoch"], watch, step, state, cfg, run, result)
                agreed = processes.broadcast((state["best"], state["bad_evals"], result.stopped_early))
                state["best"], state["bad_evals"], result.stopped_early = agreed
                if state["best"] is not None and state["best"]["step"] == step:  # a new best: keep it
                    best = processes.weights(model, names)
                    if best is not None:
                        save_tensors(best, run.checkpoints / "best.safetensors")
                if not main:
                    metrics = None
                if metrics is not None:
                    record["eval"] = metrics  # callbacks see each evaluation (e.g. a search prunes on it)
                    postfix[watch] = f"{metrics.get(watch, float('nan')):.4f}"
            due_save = step % cfg.save_every == 0 if cfg.save_every else (due_eval or epoch_end)
            if due_save and step < steps:
                rngs = processes.gather(rng_state())  # every process's RNG, for an exact resume
                weights = processes.weights(model, names)
                moments = processes.optimizer_state(model, optimizer)
                if weights is not None and moments is not None:
                    save_checkpoint(run.checkpoints, step, weights, moments, scheduler, state, rngs)
            paused += time.perf_counter() - t0
            if "loss" in record:
                postfix["loss"] = f"{record['loss']:.4f}"
            bar.set_postfix(postfix, refresh=False)
            bar.update(1)
            for callback in callbacks if main else ():
                callback(step, record)
            if result.stopped_early:
                break
        if b >= len(batches):
            state.update(epoch=epoch + 1, batch=0)

    bar.close()
    for handle in trimming:
        handle.remove()
    result.steps = step
    result.train_seconds = time.perf_counter() - started - paused
    release_free_memory()  # the steps' freed blocks, before what follows (a test evaluation, an export)
    samples, tokens = processes.sum([result.samples, result.tokens])
    result.samples, result.tokens = int(samples), int(tokens)
    result.best = state["best"]
    bounded = retention is not None and retention.max_drop is not None
    if (cfg.early_stopping or bounded) and state["best"] is not None and processes.evaluates:
        processes.load_weights(model, names, load_file(str(run.checkpoints / "best.safetensors")))
    return result


def _discard(record: dict[str, Any]) -> None:
    """What a process other than rank 0 does with a metrics line."""


def _mean_stats(processes: Processes, stats: dict[str, Any]) -> dict[str, Any]:
    """An objective's step statistics averaged over the processes (each saw its own rows)."""
    if processes.world == 1:
        return stats
    every = processes.gather(stats)
    return {k: sum(float(s[k]) for s in every) / len(every) for k in stats}


def _evaluate(model, objective, val_items, runtime, retention, eval_cfg) -> dict[str, Any]:
    """Validation metrics, with the forgetting measured beside them (`_retention` in the dict)."""
    release_free_memory()  # the training steps' freed blocks, before evaluation's own (and after)
    metrics: dict[str, Any] = evaluate_items(model, objective, val_items, runtime)
    if retention is not None:
        metrics["_retention"] = retention.measure(model, runtime)
    samples = objective.eval_samples(model, runtime, eval_cfg.max_new_tokens)
    if samples:
        metrics["_samples"] = samples
    release_free_memory()
    return metrics


def _judge(metrics, epoch, watch, step, state, cfg, run, result) -> None:
    """Log an evaluation, keep the best weights so far, and decide whether to stop (rank 0)."""
    kept = metrics.pop("_retention", None)
    samples = metrics.pop("_samples", None)
    within = kept is None or kept["within_bound"]
    _track_best(metrics, watch, step, state, cfg, run, result, within)
    if kept is not None:
        run.log({"kind": "retention", "step": step, **kept})
        result.retention.append({"step": step, **kept})
        if not within:
            result.stopped_early = True
            run.log({"kind": "retention_stop", "step": step, "best": state["best"]})
    run.log({"kind": "eval", "step": step, "epoch": epoch, "metrics": metrics, **memory_now()})
    if samples:
        run.log({"kind": "samples", "step": step, "samples": samples})
    result.evals.append({"step": step, **metrics})


def _cache(model, method, objective, train_items, val_items, cfg, runtime, spill: Path):
    """Pooled features of a frozen backbone, else what enters block `method.frozen_blocks` (the
    objective knows its inputs; it leaves items as they are where nothing can be cached)."""
    max_bytes = cfg.cache_max_mb * 2**20
    k = None if method.frozen_backbone else method.frozen_blocks

    def cache(items, name):
        return objective.cache_frozen(model, items, k, runtime, max_bytes, spill, name)

    return cache(train_items, "train"), (None if val_items is None else cache(val_items, "validation"))


def _batch_loss(model, objective, items, ids: list[int], runtime: Runtime, parts: float) -> torch.Tensor:
    """The loss of one micro-batch (a share `1 / parts` of its optimizer step's)."""
    batch = {k: v.to(runtime.device) for k, v in objective.collate([items[i] for i in ids]).items()}
    with runtime.autocast():
        return objective.loss(model(**objective.model_inputs(batch)), batch) / parts  # type: ignore[no-any-return]


def _rates(
    model, method, objective, items, lengths, cfg: TrainConfig, runtime, run: Run, names, resume, processes
) -> Rates:
    """The learning rates (training/rates.py), after a range test for `lr: auto` (recorded in plan.json;
    a resumed run reuses the recorded choice), and written to plan.json with the rule that gave them.
    Every process of a run tests the same rows; rank 0's choice is the one they all use."""
    found = None
    if cfg.lr == "auto" and resume:
        found = _recorded_choice(run)
    elif cfg.lr == "auto":
        found = processes.broadcast(
            _find_lr(model, method, objective, items, lengths, cfg, runtime, run, names, processes.main)
        )
    family, pretrained = model.pretrained_lr_scale, method.tunes_pretrained
    rates = resolve_rates(cfg.lr, cfg.head_lr, method.default_lr, pretrained, family, found, cfg.lr_multiplier)
    if processes.main:
        run.update_plan({"lr": rates.lr, "head_lr": rates.head_lr, "lr_rule": rates.rule})
    return rates


def _find_lr(
    model, method, objective, items, lengths, cfg: TrainConfig, runtime, run: Run, names, main: bool
) -> float | None:
    """Run the range test on the run's own steps; record its curve and choice in plan.json."""
    method.on_epoch_start(model, 0)  # what trains in the first epoch (gradual unfreezing)
    groups = method.param_groups(model, 1.0, 0.0, cfg.weight_decay)  # rates relative to lr; the head's apart

    def head_at(lr: float) -> float:
        return head_lr_for(lr, cfg.head_lr, method.tunes_pretrained)[0]

    def step_loss(optimizer: torch.optim.Optimizer, micro_batches: list[list[int]]) -> float:
        total = 0.0
        for ids in micro_batches:
            loss = _batch_loss(model, objective, items, ids, runtime, len(micro_batches))
            if not bool(torch.isfinite(loss)):
                return math.nan
            loss.backward()
            total += float(loss.detach())
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    batches = step_batches(lengths, cfg.batch_size, cfg.grad_accum, cfg.seed)
    curve = range_test(model, names, groups, head_at, step_loss, batches, cfg.lr_find_steps)
    chosen = choose_lr(curve.lrs, curve.losses)
    if main:
        run.update_plan({"lr_finder": curve.record(chosen)})
        run.log({"kind": "lr_finder", "step": 0, "chosen": chosen, "stop": curve.stop, "seconds": curve.seconds})
    return chosen


def _recorded_choice(run: Run) -> float | None:
    """The range test's choice recorded in plan.json by the run being resumed."""
    finder = run.plan().get("lr_finder")
    if not isinstance(finder, dict) or "chosen" not in finder:
        raise ConfigError(f"--resume {run.dir}: plan.json has no lr_finder record for train.lr: auto; start a new run")
    return None if finder["chosen"] is None else float(finder["chosen"])


def _optimizer(model: Any, method: Any, cfg: TrainConfig, rates: Rates, steps: int):
    groups = method.param_groups(model, rates.lr, rates.head_lr, cfg.weight_decay)
    if not groups:
        raise ConfigError(f"method.name={method.name}: no parameter is trainable")
    optimizer = adamw(groups, rates.lr)
    warmup = round(cfg.warmup_ratio * steps)
    scheduler = schedule(cfg.scheduler, optimizer, warmup, steps)
    return optimizer, scheduler


def _retention_baseline(retention, state, model, runtime, log, result) -> None:
    """What the base model knew: measured before the first step (kept in the checkpoint state, so a
    resumed run compares against the same baseline)."""
    if state.get("retention_baseline") is not None:
        retention.baseline = state["retention_baseline"]
        return
    kept = retention.measure(model, runtime)
    state["retention_baseline"] = retention.baseline
    log({"kind": "retention", "step": 0, **kept})
    result.retention.append({"step": 0, **kept})


def _track_best(metrics, watch, step, state, cfg, run, result, within_bound: bool = True) -> None:
    """Note the best evaluation so far (only among those whose forgetting is within bounds); the
    loop keeps its weights."""
    if watch not in metrics:
        raise ConfigError(f"early_stopping.metric={watch}: not reported; choose one of {sorted(metrics)}")
    value = float(metrics[watch])
    best = state["best"]
    min_delta = cfg.early_stopping.min_delta if cfg.early_stopping else 0.0
    better = within_bound and (
        best is None
        or (value > best["value"] + min_delta if higher_is_better(watch) else value < best["value"] - min_delta)
    )
    if better:
        state["best"] = {"step": step, "metric": watch, "value": value}
        state["bad_evals"] = 0
    else:
        state["bad_evals"] += 1
        if cfg.early_stopping and state["bad_evals"] >= cfg.early_stopping.patience:
            result.stopped_early = True
            run.log({"kind": "early_stop", "step": step, "best": state["best"]})


def _restore(run: Run, model, names, optimizer, scheduler, fingerprint: dict[str, str], processes) -> dict[str, Any]:
    latest = latest_checkpoint(run.checkpoints)
    if latest is None:
        raise ConfigError(f"{run.dir}: no complete checkpoint to resume from; start the run again")
    saved = read_json(latest / "state.json")
    for key, value in fingerprint.items():
        if saved.get(key) != value:
            what = "config" if key == "config_hash" else "data"
            raise ConfigError(
                f"--resume {run.dir}: the {what} differs from the interrupted run's ({key} {saved.get(key)} "
                f"!= {value}); resume with the same config and data, or start a new run"
            )
    before = int(saved.get("processes", 1))
    if before != processes.world:
        raise ConfigError(
            f"--resume {run.dir}: the run was trained in {before} process(es), not {processes.world}; "
            f"resume with --nproc {before} (the data order and RNG states are per process)"
        )
    weights, moments, state = load_checkpoint(latest, scheduler, processes.rank)
    processes.load_weights(model, names, weights)
    processes.load_optimizer_state(model, optimizer, moments)
    return state
