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
with `grad_accum × N` micro-batches. Only rank 0 writes the run directory and evaluates.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from tunesmith.config import DistributedConfig
from tunesmith.errors import ConfigError

__all__ = ["LaunchOptions", "Processes", "launch", "rank_share", "start_processes"]

# Evaluation runs on rank 0 while the other ranks wait in a collective; a long evaluation must not
# look like a dead peer (torch's default is 10 minutes for NCCL).
TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Processes:
    """The processes of one run: this one's rank, how many there are, and the accelerate object
    that prepares the model for them. A single process is `world == 1`, where every method here
    is a no-op."""

    accelerator: Any  # accelerate.Accelerator
    rank: int
    world: int

    @property
    def main(self) -> bool:
        """Whether this process writes the run directory (rank 0)."""
        return self.rank == 0

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

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def start_processes(cpu: bool, distributed: DistributedConfig | None) -> Processes:
    """Join the run's process group where torchrun started this process (else a single process).

    Raises:
        ConfigError: a strategy that needs what is not installed or not available here.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    world = int(os.environ.get("WORLD_SIZE", "1"))
    handlers: list[Any] = [InitProcessGroupKwargs(timeout=TIMEOUT)]
    strategy = distributed.strategy if distributed else "ddp"
    plugin: dict[str, Any] = {}
    if world > 1 and strategy == "ddp":
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=distributed_unused(distributed)))
    elif world > 1:
        plugin = _sharding_plugin(strategy, distributed, cpu)
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=handlers, **plugin)
    return Processes(accelerator, accelerator.process_index, accelerator.num_processes)


def distributed_unused(distributed: DistributedConfig | None) -> bool:
    return bool(distributed and distributed.find_unused_parameters)


def _sharding_plugin(strategy: str, distributed: DistributedConfig | None, cpu: bool) -> dict[str, Any]:
    """accelerate's plugin for `train.distributed.strategy` fsdp or deepspeed."""
    assert distributed is not None
    if strategy == "fsdp":
        from accelerate.utils import FullyShardedDataParallelPlugin

        return {
            "fsdp_plugin": FullyShardedDataParallelPlugin(
                fsdp_version=2,
                reshard_after_forward=distributed.reshard_after_forward,
                cpu_offload=distributed.cpu_offload,
                auto_wrap_policy="transformer_based_wrap",
                state_dict_type="FULL_STATE_DICT",
            )
        }
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ConfigError(
            "train.distributed.strategy=deepspeed: DeepSpeed is not installed; `pip install deepspeed`, "
            "or use strategy: ddp or fsdp"
        ) from None
    if cpu:
        raise ConfigError("train.distributed.strategy=deepspeed: needs GPUs; use strategy: ddp on CPUs")
    from accelerate.utils import DeepSpeedPlugin

    return {"deepspeed_plugin": DeepSpeedPlugin(zero_stage=distributed.zero_stage)}


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
