"""From an OpenAI job request to a tunesmith run: which task and method, how `"auto"` hyperparameters
resolve, which models a key may name, and what the `tunesmith` extension may set.

The `"auto"` rule (recorded in the job's `hyperparameters` and in the run's `plan.json`):
- `n_epochs`: enough passes to see about 3,000 rows, between 1 and 10: `clamp(ceil(3000 / rows), 1, 10)`.
- `batch_size`: rows / 100 rounded to a power of two, between 4 and 32.
- `learning_rate_multiplier`: 1.0, i.e. the default learning rate (tunesmith's defaults depend on the
  method and the model family: LoRA 5e-4, full 5e-5 for a transformer, ...); a number multiplies
  whatever rate the run chooses (`train.lr_multiplier`).
- `beta` (DPO): 0.1 (`OPENAI_METHODS` in openai_schema.py).

Requests never name server paths: a model is a packaged name, a directory under the server's
`--models` folder, or nothing else; data are uploaded file ids; the extension cannot set the output,
the data files or a reward function (a reinforcement job's reward is its grader).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from tunesmith.service.openai_schema import OPENAI_METHODS, ApiError, Hyperparameters, JobRequest
from tunesmith.zoo import PACKAGED_MODELS

__all__ = [
    "DEFAULT_METHOD",
    "available_models",
    "check_extension",
    "model_path",
    "resolve_hyperparameters",
    "run_config",
]

DEFAULT_METHOD: dict[str, Any] = {"name": "lora"}  # a CPU-friendly default; `tunesmith.method` changes it
FILE_ID = re.compile(r"^file-[0-9a-f]{24}$")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
# Extension keys the service owns: where data and outputs live, and code to import.
RESERVED = {("model",), ("output",), ("data", "train"), ("data", "validation"), ("rl", "reward")}


def available_models(models_dir: Path | None) -> list[str]:
    """Base models a job may name: the packaged ones and the directories in `--models`."""
    names = list(PACKAGED_MODELS)
    if models_dir is not None and models_dir.is_dir():
        names += sorted(p.name for p in models_dir.iterdir() if p.is_dir() and NAME.match(p.name))
    return names


def model_path(name: str, models_dir: Path | None) -> str:
    """What the run config's `model` is for a base model a job names (a packaged name stays a name)."""
    if name in PACKAGED_MODELS:
        return name
    if models_dir is not None and NAME.match(name) and (models_dir / name).is_dir():
        return str((models_dir / name).resolve())
    raise ApiError(
        400,
        f"model {name!r} is not available on this server; GET /v1/models lists the base models",
        "model",
        "model_not_available",
    )


def resolve_hyperparameters(asked: Hyperparameters, rows: int, method: str) -> dict[str, Any]:
    """The job's hyperparameters with every `"auto"` replaced by the rule above."""
    epochs = min(10, max(1, math.ceil(3000 / rows))) if asked.n_epochs == "auto" else asked.n_epochs
    batch = (
        min(32, max(4, 2 ** round(math.log2(max(rows / 100, 1))))) if asked.batch_size == "auto" else asked.batch_size
    )
    multiplier = 1.0 if asked.learning_rate_multiplier == "auto" else asked.learning_rate_multiplier
    if not 1 <= epochs <= 50:
        raise ApiError(400, "n_epochs: must be between 1 and 50", "hyperparameters.n_epochs")
    if not 1 <= batch <= 256:
        raise ApiError(400, "batch_size: must be between 1 and 256", "hyperparameters.batch_size")
    if not 0 < multiplier <= 100:
        raise ApiError(
            400, "learning_rate_multiplier: must be > 0 and <= 100", "hyperparameters.learning_rate_multiplier"
        )
    resolved: dict[str, Any] = {"n_epochs": epochs, "batch_size": batch, "learning_rate_multiplier": multiplier}
    for name, default in OPENAI_METHODS[method].defaults.items():  # e.g. DPO's beta
        value = getattr(asked, name)
        resolved[name] = default if value in (None, "auto") else value
    resolved["auto"] = sorted(k for k, v in asked.model_dump(exclude_none=True).items() if v == "auto")
    return resolved


def check_extension(extension: dict[str, Any], file_paths: dict[str, str]) -> dict[str, Any]:
    """The `tunesmith` section with uploaded file ids replaced by their stored paths.

    Raises:
        ApiError: a reserved key, or a string that looks like a server path.
    """

    def walk(value: Any, where: tuple[str, ...]) -> Any:
        if where in RESERVED:
            raise ApiError(400, f"tunesmith.{'.'.join(where)}: set by the service; use the job's fields", _param(where))
        if isinstance(value, dict):
            return {str(k): walk(v, (*where, str(k))) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, where) for v in value]
        if isinstance(value, str) and FILE_ID.match(value):
            if value not in file_paths:
                raise ApiError(404, f"tunesmith.{'.'.join(where)}: no file {value}", _param(where))
            return file_paths[value]
        if isinstance(value, str) and ("/" in value or "\\" in value or value.startswith(("~", "."))):
            raise ApiError(
                400,
                f"tunesmith.{'.'.join(where)}={value!r}: paths are not accepted; upload the file and give its id",
                _param(where),
            )
        return value

    return walk(extension, ())


def run_config(
    request: JobRequest, hyper: dict[str, Any], model: str, train: str, validation: str | None, out: str
) -> dict[str, Any]:
    """The tunesmith run config of a job (the extension, already checked, merged over it)."""
    method = request.method.type if request.method else "supervised"
    config: dict[str, Any] = {
        "model": model,
        "task": OPENAI_METHODS[method].task,
        "method": dict(DEFAULT_METHOD),
        "data": {"train": train, **({"validation": validation} if validation else {})},
        "train": {"epochs": hyper["n_epochs"], "batch_size": hyper["batch_size"], "seed": request.seed or 0},
        "output": {"dir": out, "name": "run"},
    }
    for name, path in OPENAI_METHODS[method].settings.items():
        section, key = path.split(".")
        config.setdefault(section, {})[key] = hyper[name]
    return _merge(config, request.tunesmith or {})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key != "method":
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _param(where: tuple[str, ...]) -> str:
    return "tunesmith." + ".".join(where)
