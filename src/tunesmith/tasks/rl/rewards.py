"""Where RL rewards come from: a trained reward run, or a Python function `module:function`.

A function is called as `function(prompts, completions)` with two lists of strings and returns one
number per completion. What each source is (path and content hash) goes into the run's manifest.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import ConfigError
from tunesmith.inference import load_trained
from tunesmith.runtime import Runtime

__all__ = ["RewardSource", "check_reward_spec", "load_reward"]

RewardSource = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


def check_reward_spec(spec: str | None) -> None:
    """Raise ConfigError unless `spec` names a directory or has the form module:function (cheap: the
    reward itself is loaded when the run binds it)."""
    if not spec:
        raise ConfigError("rl.reward: task rl needs a reward: a reward run directory or module:function")
    module_name, sep, name = spec.partition(":")
    if not Path(spec).expanduser().is_dir() and (not sep or not module_name or not name):
        raise ConfigError(f"rl.reward={spec!r}: neither a directory nor module:function (e.g. my_rewards:positive)")


def load_reward(spec: str | None, runtime: Runtime) -> tuple[RewardSource, dict[str, Any]]:
    """The reward function named by `rl.reward`, and its record for the manifest. A reward run scores
    on `runtime` (the command's device and precision).

    Raises:
        ConfigError: no reward given, a module or function that cannot be found, or a directory that
            is not a finished reward run.
    """
    check_reward_spec(spec)
    assert spec is not None
    if Path(spec).expanduser().is_dir():
        return _reward_run(Path(spec).expanduser(), runtime)
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"rl.reward={spec!r}: cannot import {module_name} ({exc}); is it on PYTHONPATH?") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"rl.reward={spec!r}: {module_name} has no function {name!r}")
    source = inspect.getsourcefile(function) or ""
    record = {"kind": "function", "spec": spec, "file": source, "sha256": _sha256(Path(source)) if source else None}
    return function, record


def _reward_run(run_dir: Path, runtime: Runtime) -> tuple[RewardSource, dict[str, Any]]:
    with torch.random.fork_rng():  # building the reward model (a LoRA's init) leaves the run's draws alone
        trained = load_trained(run_dir)
    if trained.task.output != "score":
        raise ConfigError(
            f"rl.reward={run_dir}: a {trained.config.task} run gives a {trained.task.output}, not a score; "
            "give a reward run"
        )
    trained.model.eval().requires_grad_(False).to(runtime.device)

    def score(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        return trained.task.score(trained, list(prompts), list(completions), runtime)

    weights = run_dir / "final" / "trainable.safetensors"
    return score, {"kind": "reward run", "run": str(run_dir.resolve()), "sha256": _sha256(weights)}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
