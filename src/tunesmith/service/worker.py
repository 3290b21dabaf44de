"""Workers: processes that claim jobs from the store and train them, one at a time each.

A worker holds a job by a lease it renews every second. Training runs in a child process
(`tunesmith.service.runner`) that dies with its worker (Linux's parent-death signal), so killing a
worker with SIGKILL at any moment stops its training too; the lease then runs out and any worker
claims the job again and continues it from the run's last checkpoint. Cancel and pause are requests
in the store that the holding worker carries out by stopping the child: a paused job continues from
its last checkpoint when it is resumed. The worker copies the run's metrics into the job's events and
its checkpoints into the job's checkpoints as they appear.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from tunesmith.service.jobs import check_extension, model_path, run_config
from tunesmith.service.openai_schema import JobRequest
from tunesmith.service.store import Checkpoint, Event, File, Job, Store, new_id, now

__all__ = ["LEASE_SECONDS", "Worker", "add_event"]

LEASE_SECONDS = 15.0  # a job whose worker has not renewed for this long is claimed again
POLL_SECONDS = 1.0
TRAINING_NICENESS = 10
COUNTS = ("tokens", "count")  # sizes of an evaluation, not metrics of it


def add_event(store: Store, job_id: str, message: str, level: str = "info", **extra: Any) -> None:
    with store.session() as s:
        s.add(
            Event(
                id=new_id("ftevent"),
                job_id=job_id,
                created_at=now(),
                level=level,
                message=message,
                type=extra.pop("type", "message"),
                data=extra.pop("data", None),
                **extra,
            )
        )


class Worker:
    """Claims and trains jobs until `stop` is set."""

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        models_dir: Path | None = None,
        name: str | None = None,
        lease_s: float = LEASE_SECONDS,
    ) -> None:
        self.store, self.data_dir, self.models_dir, self.lease_s = store, data_dir.resolve(), models_dir, lease_s
        self.name = name or f"{socket.gethostname()}:{os.getpid()}"

    def run(self, stop: threading.Event | None = None) -> None:
        stop = stop or threading.Event()
        while not stop.is_set():
            job = self.store.claim(self.name, self.lease_s)
            if job is None:
                stop.wait(POLL_SECONDS)
                continue
            self.train(job, stop)

    def train(self, job: Job, stop: threading.Event) -> None:
        job_dir = self.data_dir / "jobs" / job.id
        try:
            env = self._prepare(job, job_dir)
        except Exception as exc:  # a job that cannot even be set up fails alone; the worker goes on
            self._finish(job, "failed", error={"code": "setup_failed", "message": str(exc), "param": None})
            return
        again = job.attempts > 1
        add_event(
            self.store, job.id, "Resuming the job from its last checkpoint" if again else "Fine-tuning job started"
        )
        log = (job_dir / "log.txt").open("ab")
        child = subprocess.Popen(
            [sys.executable, "-m", "tunesmith.service.runner", str(job_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent,
        )
        try:
            outcome = self._watch(job, job_dir, child, stop)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            log.close()
        self._sync(job, job_dir)
        self._conclude(job, job_dir, outcome, child.returncode)

    def _prepare(self, job: Job, job_dir: Path) -> dict[str, str]:
        job_dir.mkdir(parents=True, exist_ok=True)
        paths = self._file_paths(job)
        extension = check_extension(job.tunesmith, paths) if job.tunesmith else None  # file ids -> their paths
        request = JobRequest(
            model=job.model, training_file=job.training_file, method=job.method, tunesmith=extension, seed=job.seed
        )
        config = run_config(
            request,
            job.hyperparameters,
            model_path(job.model, self.models_dir),
            paths[job.training_file],
            paths.get(job.validation_file or ""),
            str(job_dir / "runs"),
        )
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        grader = (job.method.get("reinforcement") or {}).get("grader")
        if grader is not None:
            from tunesmith.service.graders import write_reward_module

            config.setdefault("rl", {})["reward"] = write_reward_module(
                job_dir,
                grader,
                Path(paths[job.training_file]),
                Path(paths[job.validation_file]) if job.validation_file else None,
            )
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(job_dir), env.get("PYTHONPATH", "")) if p)
        spec = {
            "job": job.id,
            "config": config,
            "hyperparameters": job.hyperparameters,
            "learning_rate_multiplier": job.hyperparameters["learning_rate_multiplier"],
            "rule": "tunesmith.service.jobs: n_epochs clamp(ceil(3000/rows),1,10); batch rows/100 as a power of "
            "two in [4,32]; learning_rate_multiplier 1.0 (the method's default lr)",
        }
        tmp = job_dir / "job.json.tmp"
        tmp.write_text(json.dumps(spec, indent=1))
        os.replace(tmp, job_dir / "job.json")
        return env

    def _file_paths(self, job: Job) -> dict[str, str]:
        """Stored paths of the owner's files (the extension's file ids were checked at creation)."""
        with self.store.session() as s:
            files = s.scalars(select(File).where(File.owner == job.owner)).all()
            return {f.id: str(self.data_dir / f.path) for f in files}

    def _watch(self, job: Job, job_dir: Path, child: subprocess.Popen, stop: threading.Event) -> str:
        """Until the child ends or must stop: renew the lease, copy records, honour requests."""
        while child.poll() is None:
            if stop.wait(POLL_SECONDS):
                return "stopped"
            held = self.store.renew(job.id, self.name, self.lease_s)
            if held is None:
                return "lost"
            self._sync(job, job_dir)
            if held.requested in ("cancel", "pause"):
                return held.requested
        return "exited"

    def _conclude(self, job: Job, job_dir: Path, outcome: str, returncode: int | None) -> None:
        if outcome == "cancel":
            self._finish(job, "cancelled")
        elif outcome == "pause":
            self.store.release(job.id, self.name, status="paused", requested=None)
            add_event(self.store, job.id, "Job paused; resume it to continue from its last checkpoint")
        elif outcome in ("lost", "stopped"):
            # Another worker holds it now, or this worker is shutting down: hand the job back.
            self.store.release(job.id, self.name, status="queued") if outcome == "stopped" else None
        elif returncode == 0:
            result = json.loads((job_dir / "result.json").read_text())
            run_dir = str((job_dir / "runs" / result["run_dir"]).relative_to(self.data_dir))
            self._finish(
                job,
                "succeeded",
                run_dir=run_dir,
                trained_tokens=result.get("tokens"),
                output=result.get("output"),
                fine_tuned_model=fine_tuned_name(job),
            )
        else:
            error = {"code": "training_failed", "message": _last_line(job_dir / "log.txt"), "param": None}
            if (job_dir / "error.json").is_file():
                error.update(json.loads((job_dir / "error.json").read_text()))
            elif returncode is not None and returncode < 0:
                error["message"] = f"the training process was killed by signal {-returncode}"
            self._finish(job, "failed", error=error)

    def _finish(self, job: Job, status: str, **values: Any) -> None:
        if self.store.release(job.id, self.name, status=status, requested=None, finished_at=now(), **values):
            message = {"succeeded": "The job has successfully completed", "cancelled": "Job cancelled"}.get(
                status, f"Job failed: {(values.get('error') or {}).get('message', '')}"
            )
            add_event(self.store, job.id, message, level="error" if status == "failed" else "info")

    def _sync(self, job: Job, job_dir: Path) -> None:
        """Copy new lines of the run's metrics.jsonl into events, and new checkpoints."""
        runs = sorted(p for p in (job_dir / "runs").glob("run-*") if (p / "config.yaml").is_file())
        if not runs:
            return
        run = runs[-1]
        with self.store.session() as s:
            done = s.scalar(
                select(func.max(Event.source_line)).where(Event.job_id == job.id, Event.source_run == run.name)
            )
            known = set(s.scalars(select(Checkpoint.step).where(Checkpoint.job_id == job.id)))
            records = _read_lines(run / "metrics.jsonl", done or 0)
            latest: dict[str, Any] = {}
            for line, record in records:
                event = metrics_event(record)
                if event is not None:
                    message, data = event
                    latest.update(data)
                    s.add(
                        Event(
                            id=new_id("ftevent"),
                            job_id=job.id,
                            created_at=now(),
                            level="info",
                            message=message,
                            type="metrics",
                            data=data,
                            source_run=run.name,
                            source_line=line,
                        )
                    )
            steps = _plan_steps(run)
            if latest.get("step") is not None:
                s.get(Job, job.id).progress = {"step": latest["step"], "steps": steps}  # type: ignore[union-attr]
            for folder in sorted((run / "checkpoints").glob("step-*")):
                step = int(folder.name.split("-")[1])
                if step in known or not (folder / "state.json").is_file():
                    continue
                metrics = _metrics_at(run / "metrics.jsonl", step)
                s.add(
                    Checkpoint(
                        id=new_id("ftckpt"),
                        job_id=job.id,
                        step=step,
                        created_at=now(),
                        metrics=metrics,
                        model_id=f"{fine_tuned_name(job)}:ckpt-step-{step}",
                    )
                )


def fine_tuned_name(job: Job) -> str:
    """`ft:<base>:<suffix>:<id>`, the id a tuned model is used by."""
    return f"ft:{job.model}:{job.suffix or 'tunesmith'}:{job.id.split('-', 1)[1][:8]}"


def metrics_event(record: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
    """A metrics.jsonl record as OpenAI's metrics event: `Step N/…: training loss=…` with data."""
    if record.get("kind") == "train" and "loss" in record:
        data = {"step": record["step"], "train_loss": record["loss"], "learning_rate": record.get("lr")}
        data |= {k: v for k, v in record.items() if k not in ("kind", "step", "loss", "lr", "time") and _number(v)}
        return f"Step {record['step']}: training loss={record['loss']:.4f}", data
    if record.get("kind") == "eval":
        metrics = record.get("metrics", {})
        metrics = {k: v for k, v in metrics.items() if _number(v) and k not in COUNTS}
        data = {"step": record["step"], **{f"valid_{k}": v for k, v in metrics.items()}}
        if "token_accuracy" in metrics:  # OpenAI's name for it
            data["valid_mean_token_accuracy"] = metrics["token_accuracy"]
        return f"Step {record['step']}: validation " + ", ".join(
            f"{k}={v:.4f}" for k, v in metrics.items() if _number(v)
        ), data
    return None


def _metrics_at(path: Path, step: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for _, record in _read_lines(path, 0):
        event = metrics_event(record)
        if event is not None and event[1]["step"] <= step:
            metrics.update({k: v for k, v in event[1].items() if k != "step"})
    return metrics


def _read_lines(path: Path, after: int) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        return []
    out = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if number <= after or not line.endswith("\n"):
                continue  # a line still being written is read on the next pass
            with contextlib.suppress(json.JSONDecodeError):
                out.append((number, json.loads(line)))
    return out


def _plan_steps(run: Path) -> int | None:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads((run / "plan.json").read_text()).get("total_steps")
    return None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _last_line(path: Path) -> str:
    with contextlib.suppress(OSError):
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][-500:]
    return "the training process failed"


def _die_with_parent() -> None:
    """Linux: the child gets SIGKILL when its worker dies, however the worker dies. It also runs at a
    lower priority than the web process, which must answer promptly while training takes every core."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    os.setsid()  # and a SIGINT to the server's terminal is not the child's to take
    os.nice(TRAINING_NICENESS)
