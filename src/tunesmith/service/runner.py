"""One job's training, in a process of its own: `python -m tunesmith.service.runner JOB_DIR`.

The worker writes `JOB_DIR/job.json` (the run config and what the service resolved) and starts this
process; it trains with `tunesmith.api.train`, continuing the job's run from its last checkpoint when
one exists (the exact-resume guarantee of `tunesmith train --resume`), and leaves `result.json` or
`error.json` for the worker. It writes nothing to the store: the worker copies the run's records
there, so a process killed at any moment leaves nothing half-written behind.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from tunesmith.errors import TunesmithError
from tunesmith.runs import list_runs, read_json, write_json

__all__ = ["main", "run_job"]


def run_job(job_dir: Path) -> dict[str, Any]:
    """Train (or continue) the job in `job_dir`; returns what result.json holds."""
    from tunesmith import api
    from tunesmith.config import load_config
    from tunesmith.plugins import build_task
    from tunesmith.training.checkpoint import latest_checkpoint

    spec = read_json(job_dir / "job.json")
    cfg = load_config(spec["config"])
    multiplier = float(spec.get("learning_rate_multiplier", 1.0))
    # On whatever rate the run would choose (the method's default for the model, or lr: auto's).
    overrides = [f"train.lr_multiplier={multiplier}"] if multiplier != 1.0 else []
    runs = list_runs(job_dir / "runs")
    resume = runs[-1].dir if runs and latest_checkpoint(runs[-1].checkpoints) is not None else None
    recorded: list[bool] = []

    def record_service(step: int, record: dict[str, Any]) -> None:
        if recorded:
            return
        recorded.append(True)
        run = list_runs(job_dir / "runs")[-1]
        plan = read_json(run.dir / "plan.json")
        plan["service"] = {"job": spec["job"], "hyperparameters": spec["hyperparameters"], "auto_rule": spec["rule"]}
        write_json(run.dir / "plan.json", plan)

    result = api.train(spec["config"], overrides=overrides, resume=resume, callbacks=[record_service])
    summary = {
        "run_dir": result.run_dir.name,
        "tokens": result.metrics.get("train", {}).get("tokens"),
        "resumed": resume is not None,
        "output": build_task(cfg).output,  # what the tuned model gives: text, label, score, transcript
    }
    write_json(job_dir / "result.json", summary)
    return summary


def main() -> None:
    job_dir = Path(sys.argv[1])
    try:
        run_job(job_dir)
    except TunesmithError as exc:
        write_json(job_dir / "error.json", {"code": "invalid_training_config", "message": str(exc)})
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as exc:  # reported to the job as its error, with the traceback in the job's log
        traceback.print_exc()
        write_json(job_dir / "error.json", {"code": "training_failed", "message": f"{type(exc).__name__}: {exc}"})
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
