"""A run as an MLflow run, through MLflow's own tracking client (`mlflow-skinny` is enough).

The resolved config goes in as params (dotted keys), every logged step and evaluation as metrics,
eval.json's numbers as `final/...` metrics, and the run directory as artifacts when the run ends:
everything but `checkpoints/` (optimizer and resume state; the trained weights are in `final/`),
`cache/` (spilled features), and files above a size limit (a fully fine-tuned model's weights),
which are named in the run's `artifacts_left_out` tag. `mlflow-run.json` in the run directory
names the MLflow run, so a resumed run continues it.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.runs import write_json
from tunesmith.trackers.base import config_params, final_scalars, final_step, retention_scalars, step_scalars

__all__ = ["MlflowTracker", "artifacts_beside"]

URI_KEY = "train.mlflow.tracking_uri"
RECORD = "mlflow-run.json"
LEFT_OUT = ("checkpoints", "cache")  # run directory folders that are resume state, not results
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
BATCH = {"params": 100, "metrics": 1000}  # MLflow's limits on one log_batch call


class MlflowTracker:
    """Logs a run to the MLflow tracking store at `tracking_uri`, as a run of `experiment`.

    Args:
        artifact_location: where a new experiment keeps its artifacts (None: the store decides).
        max_artifact_mb: files above this many MiB stay out of the artifacts (None: no limit).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str | None,
        tags: dict[str, str],
        artifact_location: str | None,
        artifacts: bool,
        max_artifact_mb: float | None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.tags = tags
        self.artifact_location = artifact_location
        self.artifacts = artifacts
        self.max_artifact_mb = max_artifact_mb
        self._client: Any = None
        self._run_id = ""
        self._ended = False

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._client = self._connect()
        self._run_id = self._continued(run_dir) or self._new_run(run_dir)
        params = [Param(k, v[:MAX_PARAM_CHARS]) for k, v in config_params(config).items()]
        for chunk in _chunks(params, BATCH["params"]):
            self._client.log_batch(self._run_id, params=chunk)

    def log(self, step: int, record: dict[str, Any]) -> None:
        self._log_metrics(step, step_scalars(record))

    def finish(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        for step, figures in retention_scalars(metrics):
            self._log_metrics(step, figures)
        self._log_metrics(final_step(metrics), final_scalars(metrics))
        if self.artifacts:
            self._log_artifacts(run_dir)
        self._client.set_terminated(self._run_id, "FINISHED")
        self._ended = True

    def abort(self, error: BaseException) -> None:
        if self._ended or not self._run_id:
            return
        self._ended = True
        status = "FAILED" if isinstance(error, Exception) else "KILLED"  # KeyboardInterrupt: stopped by hand
        try:
            self._client.set_tag(self._run_id, "error", f"{type(error).__name__}: {error}"[:5000])
            self._client.set_terminated(self._run_id, status)
        except Exception as exc:  # the run's own error is the one to show; say this one on the way
            print(f"mlflow: could not mark run {self._run_id} {status}: {exc}", file=sys.stderr)

    # --- the steps ------------------------------------------------------------------------------

    def _connect(self) -> Any:
        """A client of a store that answers (its tables made on first use).

        Raises:
            ConfigError: the store cannot be reached or opened.
        """
        from mlflow.tracking import MlflowClient

        _reachable(self.tracking_uri)
        try:
            _make_parent(self.tracking_uri)
            client = MlflowClient(tracking_uri=self.tracking_uri)
            client.search_experiments(max_results=1)  # the first request: connects, or fails here
        except Exception as exc:  # mlflow, SQLAlchemy and the OS each raise their own
            raise ConfigError(_unusable(self.tracking_uri, exc)) from exc
        return client

    def _continued(self, run_dir: Path) -> str | None:
        """The MLflow run of an interrupted run being resumed (same store), reopened; else None."""
        record = run_dir / RECORD
        if not record.is_file():
            return None
        from mlflow.exceptions import MlflowException

        saved = json.loads(record.read_text(encoding="utf-8"))
        if saved.get("tracking_uri") != self.tracking_uri:
            return None
        try:
            self._client.update_run(saved["run_id"], status="RUNNING")
        except MlflowException as exc:  # deleted from the store since: the resumed run gets a new one
            print(f"mlflow: cannot continue run {saved['run_id']} ({exc.message}); starting a new one", file=sys.stderr)
            return None
        return str(saved["run_id"])

    def _new_run(self, run_dir: Path) -> str:
        experiment_id = self._experiment_id()
        tags = {**self.tags, "run_dir": str(run_dir.resolve())}
        run = self._client.create_run(experiment_id, run_name=self.run_name or run_dir.name, tags=tags)
        saved = {"tracking_uri": self.tracking_uri, "experiment_id": experiment_id, "run_id": run.info.run_id}
        write_json(run_dir / RECORD, saved)
        return str(run.info.run_id)

    def _experiment_id(self) -> str:
        """The experiment's id, made if new (another process may make it at the same moment)."""
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(self.experiment)
        if found is None:
            try:
                return str(self._client.create_experiment(self.experiment, artifact_location=self.artifact_location))
            except MlflowException:
                found = self._client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
        if found.lifecycle_stage == "deleted":
            raise ConfigError(
                f"train.mlflow.experiment={self.experiment}: deleted in {self.tracking_uri}; restore it "
                "(mlflow experiments restore) or choose another name"
            )
        return str(found.experiment_id)

    def _log_metrics(self, step: int, scalars: dict[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(key, value, stamp, step) for key, value in scalars.items()]
        for chunk in _chunks(metrics, BATCH["metrics"]):
            self._client.log_batch(self._run_id, metrics=chunk)

    def _log_artifacts(self, run_dir: Path) -> None:
        limit = None if self.max_artifact_mb is None else int(self.max_artifact_mb * 2**20)
        kept, left_out = _artifact_files(run_dir, limit)
        for rel in kept:
            folder = rel.parent.as_posix()
            self._client.log_artifact(self._run_id, str(run_dir / rel), None if folder == "." else folder)
        if left_out:
            names = ", ".join(p.as_posix() for p in left_out)
            self._client.set_tag(self._run_id, "artifacts_left_out", names[:5000])
            print(
                f"mlflow: over train.mlflow.max_artifact_mb={self.max_artifact_mb}, not logged: {names}",
                file=sys.stderr,
            )


def artifacts_beside(tracking_uri: str) -> str | None:
    """Where a local SQLite store keeps artifacts: `mlartifacts/` beside its file (MLflow's own default
    is relative to the working directory); None for other stores, whose server decides."""
    database = _sqlite_file(tracking_uri)
    return None if database is None else (database.resolve().parent / "mlartifacts").as_uri()


def _artifact_files(run_dir: Path, max_bytes: int | None) -> tuple[list[Path], list[Path]]:
    """The run directory's files to log, and those left out for size (paths relative to it)."""
    kept: list[Path] = []
    left_out: list[Path] = []
    for path in sorted(run_dir.rglob("*")):
        rel = path.relative_to(run_dir)
        if not path.is_file() or rel.parts[0] in LEFT_OUT:
            continue
        (left_out if max_bytes is not None and path.stat().st_size > max_bytes else kept).append(rel)
    return kept, left_out


def _reachable(uri: str) -> None:
    """Refuse a tracking server that does not answer at all (MLflow's client would retry for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import httpx

    try:
        httpx.get(uri, timeout=10.0)
    except httpx.HTTPError as exc:
        raise ConfigError(
            f"{URI_KEY}={uri}: no answer ({type(exc).__name__}: {exc}); start the server (mlflow server) or fix the URL"
        ) from None


def _make_parent(uri: str) -> None:
    """A local SQLite store's folder, made (SQLite makes the file, not the folders above it)."""
    database = _sqlite_file(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)


def _sqlite_file(uri: str) -> Path | None:
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == f"{prefix}:memory:":
        return None
    return Path(uri.removeprefix(prefix).split("?", 1)[0])


def _unusable(uri: str, exc: Exception) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"{URI_KEY}={uri}: MLflow cannot use it ({reason[:300]}); give a reachable tracking server "
        "(http://host:5000) or a database file (sqlite:///path/mlflow.db), or leave it out for "
        "sqlite:///<output.dir>/mlflow.db"
    )


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]
