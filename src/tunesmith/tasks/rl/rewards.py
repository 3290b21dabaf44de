"""Where RL rewards come from: a trained reward run, or a Python function `module:function`.

A function is called as `function(prompts, completions)` with two lists of strings and returns one
number per completion. What each source is (path and content hash) goes into the run's manifest.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.inference import load_trained
from tunesmith.runtime import Runtime

__all__ = ["Reward", "RewardSource", "load_reward"]

RewardSource = Callable[[Sequence[str], Sequence[str]], Sequence[float]]


@dataclass(frozen=True)
class Reward:
    """A loaded reward: what it is (for the manifest), and how it scores on a command's runtime."""

    record: dict[str, Any]
    scorer: Callable[[Runtime], RewardSource]  # a reward run scores on the command's device and precision

    def bind(self, runtime: Runtime) -> RewardSource:
        """The scoring function, on `runtime`."""
        return self.scorer(runtime)


def load_reward(spec: str | None) -> Reward:
    """The reward named by `rl.reward`: a finished reward run (its model loaded now), or a Python
    function `module:function`.

    Raises:
        ConfigError: no reward given, a module or function that cannot be found, or a directory that
            is not a finished reward run.
    """
    if not spec:
        raise ConfigError("rl.reward: task rl needs a reward: a reward run directory or module:function")
    if Path(spec).expanduser().is_dir():
        return _reward_run(Path(spec).expanduser())
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ConfigError(f"rl.reward={spec!r}: neither a directory nor module:function (e.g. my_rewards:positive)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"rl.reward={spec!r}: cannot import {module_name} ({exc}); is it on PYTHONPATH?") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"rl.reward={spec!r}: {module_name} has no function {name!r}")
    source = inspect.getsourcefile(function) or ""
    record = {"kind": "function", "spec": spec, "file": source, "sha256": _sha256(Path(source)) if source else None}
    return Reward(record, lambda runtime: function)


def _reward_run(run_dir: Path) -> Reward:
    trained = load_trained(run_dir)
    if trained.task.output != "score":
        raise ConfigError(
            f"rl.reward={run_dir}: a {trained.config.task} run gives a {trained.task.output}, not a score; "
            "give a reward run"
        )
    trained.model.eval().requires_grad_(False)

    def scorer(runtime: Runtime) -> RewardSource:
        trained.model.to(runtime.device)
        return lambda prompts, completions: trained.task.score(trained, list(prompts), list(completions), runtime)

    weights = run_dir / "final" / "trainable.safetensors"
    return Reward({"kind": "reward run", "run": str(run_dir.resolve()), "sha256": _sha256(weights)}, scorer)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
