"""Several trained runs on one base model, switched by name without loading the base again.

A run whose method adds a peft adapter (LoRA, IA3, prompt or prefix tuning) leaves the base weights
as they were, so one copy of the base can carry the adapters of many runs: each is added to it under
its own name (peft's multi-adapter API: `add_adapter`, then `set_adapter` to switch), and whatever
else a run trained that belongs to the model (a classifier's head) is kept aside, one per run, and
swapped in with its adapter.

Each run is first rebuilt on a *sharing copy* of the base (modules of its own, the base's very
tensors), where its weights load exactly as `load_trained` loads them: strictly, and refused when
they never trained. Its adapter then moves onto the shared model through peft's own state-dict
functions, and is read back to check that it arrived unchanged.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from tunesmith import registry
from tunesmith.build import apply_method, refuse_noop
from tunesmith.errors import ConfigError
from tunesmith.inference import SavedRun, Trained, load_trained, read_saved_run
from tunesmith.training.checkpoint import load_trainable

__all__ = ["Adapters", "RunSpec", "RunsArg", "load_adapters", "run_specs"]

# What names a run: `NAME=DIR`, a directory's name. No spaces (chat reads `/adapter NAME`), no "=".
_NAME = re.compile(r"[\w.-]+")

RunsArg = str | Path | Sequence[str | Path] | Mapping[str, str | Path]


@dataclass(frozen=True)
class RunSpec:
    """A run directory and the name it answers to."""

    name: str
    dir: Path


def run_specs(runs: RunsArg) -> list[RunSpec]:
    """Named runs from run directories (each named by its directory's name), `NAME=DIR` strings, or
    a {name: directory} mapping.

    Raises:
        ConfigError: no run, a name that cannot name a run, or two runs under one name.
    """
    if isinstance(runs, str | Path):
        runs = [runs]
    pairs = [(str(n), Path(d)) for n, d in runs.items()] if isinstance(runs, Mapping) else [_named(r) for r in runs]
    if not pairs:
        raise ConfigError("no run given: name a finished run directory")
    seen: dict[str, Path] = {}
    for name, path in pairs:
        if not _NAME.fullmatch(name):
            raise ConfigError(
                f"{path}: {name!r} cannot name a run (letters, digits, '.', '-' and '_' only); "
                f"name it yourself: NAME={path}"
            )
        if name in seen:
            raise ConfigError(f"two runs are named {name}: {seen[name]} and {path}; name them apart: NAME=DIR")
        seen[name] = path
    return [RunSpec(name, path) for name, path in pairs]


def _named(run: str | Path) -> tuple[str, Path]:
    """(name, directory) of `DIR` or `NAME=DIR` (an existing path with "=" in it is a path)."""
    if isinstance(run, str) and "=" in run and not Path(run).exists():
        name, _, where = run.partition("=")
        return name, Path(where)
    return Path(os.path.abspath(run)).name, Path(run)


def _unknown_run(name: str, names: Sequence[str]) -> str:
    return (
        f"no run is named {name!r}; the runs loaded are {', '.join(names)} "
        "(a run is named by its directory's name, or by NAME in NAME=DIR)"
    )


class Adapters:
    """Trained runs loaded under names, one of them active. Several runs share one model: the base
    with each run's peft adapter by name; `use` switches which one answers."""

    def __init__(
        self,
        runs: dict[str, Trained],
        peft_model: Any = None,
        slots: dict[str, str] | None = None,
        own: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.runs = runs
        self._peft = peft_model  # the shared peft model (None for one run loaded alone)
        self._slots = slots or {}  # run name -> its adapter's name in the peft model
        self._own = own or {}  # run name -> its trained tensors that are part of the model (a head)
        self.active = next(iter(runs))
        self.use(self.active)

    @property
    def names(self) -> list[str]:
        return list(self.runs)

    def use(self, name: str | None = None) -> Trained:
        """Make run `name` (default: the active one) the one the model answers as; returns it.

        Raises:
            ConfigError: no run is loaded under `name`.
        """
        name = self.active if name is None else name
        if name not in self.runs:
            raise ConfigError(_unknown_run(name, self.names))
        if self._peft is not None:
            self._peft.set_adapter(self._slots[name], inference_mode=True)
            _put_tensors(self.runs[name].model, self._own[name])
        self.active = name
        return self.runs[name]


def load_adapters(runs: RunsArg, active: str | None = None) -> Adapters:
    """Load runs for use by name: one run as `load_trained` loads it; several runs, which must add
    peft adapters to the same base model, as named adapters on one copy of that base (loaded once).

    Args:
        runs: run directories (each named by its directory's name), `NAME=DIR` strings, or {name: dir}.
        active: the run to answer first (default: the first one).

    Raises:
        ConfigError: `active` names none of the runs (said before anything loads), or the runs
            cannot share a base: a method that changes the model itself rather than adding a peft
            adapter, another model or task, or adapters of different kinds.
    """
    specs = run_specs(runs)
    names = [spec.name for spec in specs]
    if active is not None and active not in names:
        raise ConfigError(_unknown_run(active, names))
    if len(specs) == 1:
        loaded = Adapters({names[0]: load_trained(specs[0].dir)})
    else:
        loaded = _load_shared({spec.name: read_saved_run(spec.dir) for spec in specs})
    loaded.use(active)
    return loaded


@dataclass
class _Adapter:
    """One run's part of the shared model: its peft adapter (config and weights), where the method
    put it, and the run's own copies of trained tensors that belong to the base (a head)."""

    slot: str  # the child of the model that peft wraps (a model's `backbone`)
    config: Any  # peft config, set for inference
    state: dict[str, torch.Tensor]  # peft's state dict of the adapter, keys without adapter name
    own: dict[str, torch.Tensor]


def _load_shared(saved: dict[str, SavedRun]) -> Adapters:
    runs = list(saved.values())
    _check_shareable(runs)
    objectives = {name: run.load_objective() for name, run in saved.items()}
    first = runs[0]
    base = first.task.build_model(len(first.labels))  # the one load of the base model
    parts = {name: _adapter_of(run, base) for name, run in saved.items()}
    _check_kinds(saved, parts)
    peft_model, slots = _attach(base, parts, saved)
    base.eval()
    loaded = {
        name: Trained(run.config, run.task, run.method, base, objectives[name], run.run) for name, run in saved.items()
    }
    return Adapters(loaded, peft_model, slots, {name: part.own for name, part in parts.items()})


def _check_shareable(runs: list[SavedRun]) -> None:
    """Refuse, before the base loads, runs that cannot share one: a method that is not a peft
    adapter, another task, another model section."""
    first = runs[0]
    for run in runs:
        if not run.method.peft_adapter:
            able = ", ".join(name for name, cls in registry.methods().items() if cls.peft_adapter)
            raise ConfigError(
                f"{run.run.dir}: method.name={run.method.name} trains the model itself rather than adding a peft "
                f"adapter beside it, so the run cannot share a base model with others (runs of {able} can); "
                "load it alone"
            )
    for run in runs[1:]:
        if type(run.task) is not type(first.task):  # the same task plug-in, whichever it is
            raise ConfigError(
                f"{run.run.dir}: a {run.config.task} run, and {first.run.dir} a {first.config.task} run; "
                "runs share a base model only within one task"
            )
        mine, theirs = run.config.model.model_dump(), first.config.model.model_dump()
        for key in mine:
            if mine[key] != theirs[key]:
                raise ConfigError(
                    f"{run.run.dir}: model.{key}={mine[key]}, but {first.run.dir} has model.{key}={theirs[key]}; "
                    "runs share a base model only when they start from the same one"
                )


def _adapter_of(run: SavedRun, base: nn.Module) -> _Adapter:
    """The run rebuilt on a sharing copy of `base`, its weights loaded strictly: its peft adapter,
    and its own copies of the trained tensors that are part of the base."""
    run.task.check_method(run.method)
    shell = _sharing_copy(base)
    names = apply_method(run.config, run.method, shell)
    own = _unshare(shell, base, names, run.weights)
    load_trainable(shell, names, run.weights)
    refuse_noop(run.method, shell)
    slot, wrapped = _peft_child(shell, run)
    from peft import get_peft_model_state_dict

    name = wrapped.active_adapter
    config = copy.deepcopy(wrapped.peft_config[name])
    config.inference_mode = True  # as peft loads a saved adapter: no training-only parts (a prefix's MLP)
    # For prompt and prefix tuning this is what the virtual tokens are, the MLP of a projected prefix applied.
    state = get_peft_model_state_dict(wrapped, adapter_name=name, save_embedding_layers=False)
    tensors = _tensors(shell)
    return _Adapter(slot, config, state, {n: tensors[n] for n in own})


def _check_kinds(saved: dict[str, SavedRun], parts: dict[str, _Adapter]) -> None:
    """peft keeps adapters of one kind on a model (one LoRA and one IA3 adapter cannot share it)."""
    (first, part), *rest = parts.items()
    for name, other in rest:
        if other.config.peft_type != part.config.peft_type:
            raise ConfigError(
                f"{saved[name].run.dir} (method.name={saved[name].method.name}) adds peft adapters of kind "
                f"{other.config.peft_type.value}, and {saved[first].run.dir} (method.name={saved[first].method.name}) "
                f"of kind {part.config.peft_type.value}; peft holds adapters of one kind on a model: "
                "load runs of one method together"
            )


def _attach(base: nn.Module, parts: dict[str, _Adapter], saved: dict[str, SavedRun]) -> tuple[Any, dict[str, str]]:
    """Wrap `base` in peft once and add every run's adapter to it; returns the peft model and each
    run's adapter name in it."""
    import peft

    # peft's own names (adapter_0, ...): a user's name could clash with peft's key handling ("a" is
    # in the "lora_" prefix, ".b" starts ".bias" in the key rewriting of its state dicts).
    slots = {name: f"adapter_{i}" for i, name in enumerate(parts)}
    (first, part), *_ = parts.items()
    peft_model = peft.get_peft_model(getattr(base, part.slot), part.config, adapter_name=slots[first])
    setattr(base, part.slot, peft_model)
    for name, adapter in parts.items():
        if name != first:
            peft_model.add_adapter(slots[name], adapter.config)
        _load_state(peft_model, slots[name], adapter.state, saved[name])
    return peft_model, slots


def _load_state(peft_model: Any, slot: str, state: dict[str, torch.Tensor], run: SavedRun) -> None:
    """Load an adapter's weights into `slot`, and read them back: they must arrive unchanged."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    set_peft_model_state_dict(peft_model, state, adapter_name=slot)
    back = get_peft_model_state_dict(peft_model, adapter_name=slot, save_embedding_layers=False)
    differ = sorted(set(state) ^ set(back)) or [k for k in state if not torch.equal(state[k], back[k])]
    if differ:
        raise ConfigError(
            f"{run.run.dir}: its adapter did not load unchanged onto the shared base model ({differ[0]} and "
            f"{len(differ) - 1} more differ); load the run alone"
        )


def _sharing_copy(module: nn.Module, memo: dict[int, nn.Module] | None = None) -> nn.Module:
    """A copy of a tree of modules holding the very same parameters and buffers. Each module's own
    tables (children, parameters, buffers, hooks) are copied, so a method that wraps a layer or adds
    a hook in the copy leaves the original as it was; no tensor is copied."""
    memo = {} if memo is None else memo
    if id(module) in memo:
        return memo[id(module)]
    clone = copy.copy(module)
    for key, value in vars(module).items():
        if isinstance(value, dict | set):
            vars(clone)[key] = copy.copy(value)
    memo[id(module)] = clone
    for name, child in module._modules.items():
        if child is not None:
            clone._modules[name] = _sharing_copy(child, memo)
    return clone


def _unshare(shell: nn.Module, base: nn.Module, names: list[str], weights: Path) -> list[str]:
    """Give the shell fresh tensors, shaped as the run saved them, for what it trained that is a
    tensor of the base (a head, sized by the run's own labels); returns their names."""
    shared = {id(t) for t in (*base.parameters(), *base.buffers())}
    tensors = _tensors(shell)
    own = [name for name in names if id(tensors[name]) in shared]
    saved = load_file(str(weights)) if own else {}
    for name in own:
        fresh = torch.empty_like(saved.get(name, tensors[name]))
        is_param = isinstance(tensors[name], nn.Parameter)
        _put(shell, name, nn.Parameter(fresh, requires_grad=False) if is_param else fresh)
    return own


def _peft_child(shell: nn.Module, run: SavedRun) -> tuple[str, Any]:
    """The child of the model that the run's method wrapped in a peft model."""
    from peft import PeftModel

    found = [(name, child) for name, child in shell.named_children() if isinstance(child, PeftModel)]
    if len(found) != 1:
        raise ConfigError(
            f"{run.run.dir}: method.name={run.method.name} put no peft adapter on the model, so the run cannot "
            "share a base model with others; load it alone"
        )
    return found[0]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(model.named_parameters())
    tensors.update(model.named_buffers())
    return tensors


def _put(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, tensor)


def _put_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Swap a run's own tensors into the shared model, on the device the model is on."""
    device = next(model.parameters()).device
    for name, tensor in tensors.items():
        if tensor.device != device:
            tensor.data = tensor.data.to(device)
        _put(model, name, tensor)
