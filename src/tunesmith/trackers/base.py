"""What every experiment tracker speaks: the `Tracker` protocol, and the run's numbers as flat names.

One naming scheme for all trackers, so a metric reads the same in TensorBoard and in MLflow:
`train/loss`, `train/lr`, `train/<step stat>` at log steps, `eval/<metric>` at each evaluation,
`retention/<figure>` at each retention measurement, and `final/<split>/<metric>` for eval.json's
numbers when the run ends. The config goes in as dotted keys (`train.lr`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Protocol

__all__ = [
    "Tracker",
    "config_params",
    "final_scalars",
    "final_step",
    "flatten_config",
    "retention_scalars",
    "step_scalars",
]

_UNSAFE = re.compile(r"[^\w\-. :/]")  # what MLflow allows in a metric or param name


class Tracker(Protocol):
    """An experiment tracker: sees the resolved config, every logged step, and the run's end."""

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        """Open the tracker's record of the run in `run_dir`, with the resolved config.

        Raises:
            ConfigError: the tracker's destination cannot be used (naming its config key).
        """
        ...

    def log(self, step: int, record: dict[str, Any]) -> None:
        """Record one optimizer step's record (a step callback of the training loop)."""
        ...

    def finish(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        """Record the final metrics (eval.json's) and close; the run finished."""
        ...

    def abort(self, error: BaseException) -> None:
        """Close the record as failed (no-op before start or once finished); never raises, so `error`
        is what is seen."""
        ...


def flatten_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The leaves of a nested config under dotted keys: {'train': {'lr': 1e-4}} -> {'train.lr': 1e-4}
    (an empty mapping is a leaf, so every key of the config appears)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat |= flatten_config(value, f"{name}.")
        else:
            flat[_safe(name)] = value
    return flat


def config_params(config: dict[str, Any]) -> dict[str, str]:
    """The flattened config as text values: strings as they are, everything else as JSON (null, true,
    0.0002, [..])."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in flatten_config(config).items()}


def step_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of a training-loop record: loss, lr and step stats under `train/` (with the epoch),
    and the evaluation's under `eval/`; nothing on a step that neither logged nor evaluated."""
    stats = {k: v for k, v in record.items() if k not in ("step", "epoch", "eval")}
    scalars = _numbers(stats, "train")
    if scalars and _is_number(record.get("epoch")):
        scalars["train/epoch"] = float(record["epoch"])
    evaluated = record.get("eval")
    if isinstance(evaluated, dict):
        scalars |= _numbers(evaluated, "eval")
    return scalars


def final_scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """eval.json's numbers under `final/` (`final/validation/accuracy`, `final/train/steps`); lists
    such as a confusion matrix or the retention history are left out."""
    return _numbers(metrics, "final")


def final_step(metrics: dict[str, Any]) -> int:
    """The step the final metrics belong to: the run's last optimizer step."""
    train = metrics.get("train")
    steps = train.get("steps") if isinstance(train, dict) else None
    return int(steps) if isinstance(steps, int | float) else 0


def retention_scalars(metrics: dict[str, Any]) -> list[tuple[int, dict[str, float]]]:
    """Each retention measurement in eval.json (the baseline at step 0, then every evaluation) as
    (step, {retention/value, retention/baseline, retention/change})."""
    retention = metrics.get("retention")
    history = retention.get("history") if isinstance(retention, dict) else None
    points = []
    for entry in history or []:
        figures = {k: v for k, v in entry.items() if k != "step"}
        points.append((int(entry["step"]), _numbers(figures, "retention")))
    return points


def _numbers(data: dict[str, Any], prefix: str) -> dict[str, float]:
    """The numeric leaves of nested mappings under `prefix/key/...` (booleans and lists left out)."""
    found: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}/{key}"
        if isinstance(value, dict):
            found |= _numbers(value, name)
        elif _is_number(value):
            found[_safe(name)] = float(value)
    return found


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _safe(name: str) -> str:
    """A name MLflow accepts (a label like `très bon!` keeps its letters; other marks become _)."""
    return _UNSAFE.sub("_", name)
