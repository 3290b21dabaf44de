"""Experiment trackers (`train.report_to: [tensorboard, mlflow]`): a run's metrics, config and files,
also written where practitioners look for them.

`build_trackers` turns the config into trackers (refusing, before any work, one whose package is not
installed); `Trackers.active` opens them for a run directory and closes them as failed if the run
raises; the training loop feeds them through its step callbacks. The libraries are imported only
here, when a run asks for them, so `import tunesmith` stays light.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.trackers.base import Tracker

__all__ = ["Tracker", "Trackers", "build_trackers"]

# name in train.report_to -> (module to import, package to install)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow-skinny")}


class Trackers:
    """A run's trackers as one: each call goes to every tracker, in order."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    @contextmanager
    def active(self, run_dir: Path, config: dict[str, Any]) -> Iterator[Trackers]:
        """Start every tracker for `run_dir`; if that or the block raises, close each one as failed
        (a tracker not yet started ignores it)."""
        try:
            for tracker in self.trackers:
                tracker.start(run_dir, config)
            yield self
        except BaseException as error:
            for tracker in self.trackers:
                tracker.abort(error)
            raise

    def log(self, step: int, record: dict[str, Any]) -> None:
        """A step callback of the training loop."""
        for tracker in self.trackers:
            tracker.log(step, record)

    def finish(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        for tracker in self.trackers:
            tracker.finish(run_dir, metrics)


def build_trackers(cfg: RunConfig) -> Trackers:
    """The trackers `cfg.train.report_to` names, with their settings resolved.

    TensorBoard comes first, so its event files are closed before MLflow copies the run directory.

    Raises:
        ConfigError: a tracker's package is not installed (naming `train.report_to` and the pip command).
    """
    builders: dict[str, Callable[[RunConfig], Tracker]] = {"tensorboard": _tensorboard, "mlflow": _mlflow}
    wanted = set(cfg.train.report_to)
    for name in builders:
        if name in wanted:
            _require(name)
    return Trackers([build(cfg) for name, build in builders.items() if name in wanted])


def _require(name: str) -> None:
    module, package = PACKAGES[name]
    try:
        importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"train.report_to: {name} needs the {package} package, which is not installed; "
            f"pip install {package} (or leave {name} out of train.report_to)"
        ) from None


def _tensorboard(cfg: RunConfig) -> Tracker:
    from tunesmith.trackers.tensorboard import TensorBoardTracker

    log_dir = cfg.train.tensorboard.log_dir
    return TensorBoardTracker(Path(log_dir) if log_dir else None)


def _mlflow(cfg: RunConfig) -> Tracker:
    from tunesmith.trackers.mlflow import MlflowTracker, artifacts_beside

    settings = cfg.train.mlflow
    uri = settings.tracking_uri or f"sqlite:///{(Path(cfg.output.dir) / 'mlflow.db').resolve()}"
    return MlflowTracker(
        tracking_uri=uri,
        experiment=settings.experiment or cfg.output.name or f"{cfg.task}-{cfg.method.name}",
        run_name=settings.run_name,
        tags=dict(settings.tags),
        artifact_location=artifacts_beside(uri),
        artifacts=settings.artifacts,
        max_artifact_mb=settings.max_artifact_mb,
    )
