"""TensorBoard event files of a run, written with torch's own `SummaryWriter` (needs `tensorboard`).

Scalars at every logged step and evaluation, the resolved config as text (and, when the run ends, as
the HParams dashboard's hyperparameters beside the final metrics). A resumed run writes into the same
directory and tells TensorBoard to drop what the interrupted run logged past its checkpoint
(`purge_step`), so the curves do not double back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunesmith.trackers.base import final_scalars, final_step, flatten_config, retention_scalars, step_scalars

__all__ = ["TensorBoardTracker"]


class TensorBoardTracker:
    """Writes a run's numbers to TensorBoard event files in `log_dir` (default `<run dir>/tensorboard`)."""

    def __init__(self, log_dir: Path | None) -> None:
        self.log_dir = log_dir
        self._dir: Path | None = None
        self._config: dict[str, Any] = {}
        self._resumed = False
        self._writer: Any = None
        self._ended = False

    def start(self, run_dir: Path, config: dict[str, Any]) -> None:
        self._dir = self.log_dir or run_dir / "tensorboard"
        self._config = config
        self._resumed = any(self._dir.glob("events.out.tfevents.*"))  # files of the interrupted run

    def log(self, step: int, record: dict[str, Any]) -> None:
        scalars = step_scalars(record)
        if not scalars:
            return
        writer = self._open(step)
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, step)

    def finish(self, run_dir: Path, metrics: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        step = final_step(metrics)
        writer = self._open(step)
        for at, figures in retention_scalars(metrics):
            for tag, value in figures.items():
                writer.add_scalar(tag, value, at)
        final = final_scalars(metrics)
        for tag, value in final.items():
            writer.add_scalar(tag, value, step)
        # The HParams dashboard: this run's config beside its final metrics (tags of the scalars above).
        for summary in hparams(_hparam_values(self._config), final):
            writer.file_writer.add_summary(summary)
        self._close()

    def abort(self, error: BaseException) -> None:
        self._close()

    def _open(self, step: int) -> Any:
        """The writer, made at the first step seen: a resumed run purges what came after its checkpoint."""
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            assert self._dir is not None, "start() first"
            self._writer = SummaryWriter(log_dir=str(self._dir), purge_step=step if self._resumed else None)
            if not self._resumed:  # the interrupted run's files have it
                self._writer.add_text("config", _as_markdown(self._config), 0)
        return self._writer

    def _close(self) -> None:
        if self._writer is not None and not self._ended:
            self._writer.close()
        self._ended = True


def _hparam_values(config: dict[str, Any]) -> dict[str, Any]:
    """The flattened config as HParams accepts it: numbers, strings and booleans as they are, lists and
    mappings as JSON text; unset (null) values left out."""
    kept: dict[str, Any] = {}
    for key, value in flatten_config(config).items():
        if isinstance(value, list | dict):
            kept[key] = json.dumps(value)
        elif value is not None:
            kept[key] = value
    return kept


def _as_markdown(config: dict[str, Any]) -> str:
    """The config as a YAML block TensorBoard's text panel shows verbatim (indented: a Markdown code block)."""
    import yaml

    text = yaml.safe_dump(config, sort_keys=False)
    return "\n".join(f"    {line}" for line in text.splitlines())
