"""Checkpoints for exact resume, and the trained weights of a run.

A checkpoint directory holds the trainable weights (safetensors), optimizer and scheduler state,
every RNG state, the data position and the config/data hashes. It is written into a temporary
directory and renamed into place, so a directory named `step-N` is always complete.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.runs import read_json, write_json

__all__ = [
    "latest_checkpoint",
    "load_checkpoint",
    "load_tensors",
    "load_trainable",
    "rng_state",
    "save_checkpoint",
    "save_tensors",
    "save_trainable",
    "set_rng_state",
    "trainable_state",
]

KEEP_LAST = 2


def trainable_state(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The named parameters (and trained buffers, such as the running statistics of batch norms
    that train), detached, contiguous, on the CPU (what a run's weights are)."""
    tensors = _tensors(model)
    return {name: tensors[name].detach().cpu().contiguous() for name in names}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def save_trainable(model: nn.Module, names: list[str], path: Path) -> None:
    save_tensors(trainable_state(model, names), path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write tensors to a safetensors file atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_trainable(model: nn.Module, names: list[str], path: Path) -> None:
    """Load saved trainable weights; any missing or unexpected key is an error, never a no-op."""
    if not path.is_file():
        raise ConfigError(f"{path}: trained weights not found (was the run finished? try --resume)")
    load_tensors(model, names, load_file(str(path)), str(path))


def load_tensors(model: nn.Module, names: list[str], state: dict[str, torch.Tensor], source: str) -> None:
    """Copy `state` into the model's tensors `names`, which it must hold exactly, shape for shape."""
    missing = sorted(set(names) - set(state))
    unexpected = sorted(set(state) - set(names))
    if missing or unexpected:
        raise ConfigError(
            f"{source}: weights do not fit the model built from the run's config "
            f"(missing: {_few(missing)}; unexpected: {_few(unexpected)}). "
            "Was the file written by another method or model?"
        )
    params = _tensors(model)
    with torch.no_grad():
        for name in names:
            if params[name].shape != state[name].shape:
                wanted = tuple(params[name].shape)
                raise ConfigError(f"{source}: {name} has shape {tuple(state[name].shape)}, the model wants {wanted}")
            params[name].copy_(state[name])


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    folder: Path,
    step: int,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: dict[str, Any],
    rngs: list[dict[str, Any]] | None = None,
) -> Path:
    """Write `folder/step-<step>` atomically; keep the last KEEP_LAST step checkpoints.

    `rngs` holds every process's RNG state in rank order (default: this process's alone)."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{step:07d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    try:
        save_tensors(weights, tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rngs[0] if rngs else rng_state(),
                "rng_per_process": rngs or [rng_state()],
            },
            tmp / "training_state.pt",
        )
        write_json(tmp / "state.json", {"step": step, **state})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(folder.glob("step-*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint; half-written ones (a kill during a save) are removed."""
    for partial in folder.glob(".tmp-*"):
        shutil.rmtree(partial, ignore_errors=True)
    done = sorted(p for p in folder.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(
    path: Path, scheduler: Any, rank: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """Restore the scheduler and process `rank`'s RNG from `path`; return the checkpoint's weights,
    its optimizer state and its state.json (the caller puts them into the model and optimizer)."""
    weights = load_file(str(path / "trainable.safetensors"))
    blob = torch.load(path / "training_state.pt", weights_only=False)
    scheduler.load_state_dict(blob["scheduler"])
    set_rng_state(blob.get("rng_per_process", [blob["rng"]])[rank])
    return weights, blob["optimizer"], read_json(path / "state.json")


def _few(names: list[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
