"""One run in several processes: data-parallel training through accelerate (DDP), launched by
torchrun's elastic launcher.

`tunesmith train CFG --nproc N` starts N copies of `tunesmith train CFG` (`launch`); torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) tells each copy its place, and `start_processes`
joins them into one process group (gloo on CPUs, NCCL on GPUs). The `Processes` object is the one
thing at that boundary: the loop and `api.train` ask it who writes, and use it to agree.

How the work is split: the micro-batches of one optimizer step are dealt out round-robin over the
ranks (`rank_share`), so no row is seen twice; every rank runs the same number of micro-batches
(a rank left short runs a zero-weighted copy, so the collectives line up); DDP averages the
gradients, and each loss is scaled by N so that the average is the sum a single process computes
with `grad_accum × N` micro-batches. Only rank 0 writes the run directory.

`train.distributed.strategy: fsdp` shards the weights, gradients and optimizer state over the
processes instead (torch's fully_shard), for a model that does not fit one device; the weights are
gathered for checkpoints and at the end.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from tunesmith.config import DistributedConfig
from tunesmith.errors import ConfigError
from tunesmith.training.checkpoint import load_tensors, trainable_state

__all__ = ["FsdpOptions", "LaunchOptions", "Processes", "launch", "rank_share", "start_processes"]

# Evaluation runs on rank 0 while the other ranks wait in a collective; a long evaluation must not
# look like a dead peer (torch's default is 10 minutes for NCCL).
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class FsdpOptions:
    reshard_after_forward: bool = True
    cpu_offload: bool = False


@dataclass(frozen=True)
class Processes:
    """The processes of one run: this one's rank, how many there are, and how they share the model.
    A single process is `world == 1`, where every method here does what one process would.

    With DDP (and one process) rank 0 alone evaluates and finishes the run; with FSDP the model's
    weights live in shards, so every process runs every forward pass (evaluation too) and rank 0
    alone writes."""

    accelerator: Any  # accelerate.Accelerator
    rank: int
    world: int
    shards: FsdpOptions | None = None  # train.distributed.strategy fsdp

    @property
    def sharded(self) -> bool:
        return self.shards is not None

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory (rank 0)."""
        return self.rank == 0

    @property
    def evaluates(self) -> bool:
        """Whether this process runs evaluations and the end of the run."""
        return self.main or self.sharded

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module that trains: DDP's wrapper, the model sharded in place (FSDP), or the model."""
        if self.shards is not None:
            return _shard(model, self.shards)
        return self.accelerator.prepare_model(model)  # type: ignore[no-any-return]

    def sync(self, net: nn.Module, last: bool) -> AbstractContextManager[Any]:
        """Around one micro-batch's backward pass: gradients are reduced over the processes only
        after the last micro-batch of a step."""
        if self.sharded:
            net.set_requires_gradient_sync(last)  # type: ignore[operator]
            return nullcontext()
        return nullcontext() if last else self.accelerator.no_sync(net)

    def weights(self, model: nn.Module, names: list[str]) -> dict[str, torch.Tensor] | None:
        """The trainable weights in full on rank 0 (None elsewhere); with FSDP every process must
        call this, since the shards are gathered."""
        if not self.sharded:
            return trainable_state(model, names) if self.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full: dict[str, Any] = get_model_state_dict(
            model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {n: full[n].contiguous() for n in names} if self.main else None

    def load_weights(self, model: nn.Module, names: list[str], tensors: dict[str, torch.Tensor]) -> None:
        """Put full trainable weights (every process has them) into the model, or its shards."""
        if not self.sharded:
            load_tensors(model, names, tensors, "checkpoint")
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full: dict[str, Any] = dict(tensors)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer's state in full on rank 0 (None elsewhere; with FSDP a collective)."""
        if not self.sharded:
            return optimizer.state_dict() if self.main else None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = get_optimizer_state_dict(model, optimizer, options=options)
        return full if self.main else None

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (a picklable object)."""
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return t.tolist()  # type: ignore[no-any-return]

    def all(self, flag: bool) -> bool:
        """True where `flag` holds on every rank."""
        return self.sum([float(flag)])[0] == self.world

    def finish(self) -> None:
        """End a run that finished on every rank: wait for the others, then leave the process group.

        Left to the interpreter's exit, gloo's threads can be torn down while still joinable, and
        a run that succeeded exits with "terminate called without an active exception" (status
        250). Not called when a rank fails: the launcher stops the others.
        """
        if self.world == 1:
            return
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()


def start_processes(cpu: bool, distributed: DistributedConfig | None) -> Processes:
    """Join the run's process group where torchrun started this process (else a single process).

    Raises:
        ConfigError: a strategy that needs what is not installed or not available here.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    strategy = distributed.strategy if distributed else "ddp"
    handlers: list[Any] = [InitProcessGroupKwargs(timeout=TIMEOUT)]
    if world > 1:
        unused = bool(distributed and distributed.find_unused_parameters)
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=unused))
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=handlers)
    shards = FsdpOptions(distributed.reshard_after_forward, distributed.cpu_offload) if distributed else None
    sharded = world > 1 and strategy == "fsdp"
    return Processes(accelerator, accelerator.process_index, accelerator.num_processes, shards if sharded else None)


def _shard(model: nn.Module, options: FsdpOptions) -> nn.Module:
    """FSDP (torch's fully_shard, "FSDP2"): each transformer block its own unit, then the rest.

    The blocks are the classes a Hugging Face model names in `_no_split_modules` (BertLayer,
    LlamaDecoderLayer, ...); a model without them is sharded as one unit. Parameters, gradients and
    optimizer state are split over the processes, gathered a block at a time for each pass.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    kwargs: dict[str, Any] = {"reshard_after_forward": options.reshard_after_forward}
    if options.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    blocks = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, **kwargs)
    # The rest (embeddings, the output layer) stays gathered from forward to backward: objectives use
    # the output layer's weight after the forward pass (the chunked LM loss), and backward needs it next.
    fully_shard(model, **(kwargs | {"reshard_after_forward": False}))
    return model


def rank_share(group: Sequence[list[int]], rank: int, world: int) -> list[tuple[list[int], bool]]:
    """This rank's micro-batches of one optimizer step's `group`, each with whether it counts.

    Micro-batch i goes to rank i % world. Every rank gets the same number (ceil(len/world)): a rank
    left short gets zero-weighted copies of the group's first micro-batch, so that every rank runs
    the same forward and backward passes and the collectives of DDP line up.
    """
    mine = [(ids, True) for ids in group[rank::world]]
    rounds = -(-len(group) // world)
    return mine + [(group[0], False)] * (rounds - len(mine))


@dataclass(frozen=True)
class LaunchOptions:
    """Where the processes of one run start: `nproc` on this machine, on `nnodes` machines."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    rdzv_endpoint: str | None = None  # host:port of a c10d rendezvous (then node ranks are assigned)
    run_id: str = "tunesmith"


def launch(args: Sequence[str], options: LaunchOptions) -> int:
    """Run `python -m tunesmith ARGS` in `options.nproc` processes under torchrun's elastic agent;
    returns the first failing process's exit status (0 when all succeed).

    Each process gets `cores // nproc` CPU threads where OMP_NUM_THREADS is not set (torchrun
    would give each one thread).
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The processes print their own errors (one line each); the agent's report of them is noise.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)

    if options.nproc < 1 or options.nnodes < 1:
        raise ConfigError("--nproc and --nnodes must be at least 1")
    if not 0 <= options.node_rank < options.nnodes:
        raise ConfigError(f"--node-rank {options.node_rank}: must be in 0..{options.nnodes - 1}")
    cores = os.cpu_count() or 1
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, cores // options.nproc)))
    if options.rdzv_endpoint:
        backend, endpoint = "c10d", options.rdzv_endpoint
    else:
        backend, endpoint = "static", f"{options.master_addr}:{options.master_port}"
    config = LaunchConfig(
        min_nodes=options.nnodes,
        max_nodes=options.nnodes,
        nproc_per_node=options.nproc,
        run_id=options.run_id,
        rdzv_backend=backend,
        rdzv_endpoint=endpoint,
        rdzv_configs={"rank": options.node_rank} if backend == "static" else {},
        max_restarts=0,
        monitor_interval=0.5,
    )
    try:
        elastic_launch(config, sys.executable)("-m", "tunesmith", *args)
    except ChildFailedError as failed:
        codes = [f.exitcode for f in failed.failures.values()]
        return next((c for c in codes if c not in (0, None)), 1)
    return 0
