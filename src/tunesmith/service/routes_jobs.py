"""Routes of `/v1/fine_tuning/jobs`: create, list, retrieve, cancel, pause, resume, events,
checkpoints, and tunesmith's report and export of a finished job."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from sqlalchemy import select

from tunesmith.service.deps import Config, Owner, Settings, cursor_slice, owned_file
from tunesmith.service.jobs import check_extension, model_path, resolve_hyperparameters
from tunesmith.service.openai_schema import (
    ApiError,
    Hyperparameters,
    JobRequest,
    checkpoint_object,
    event_object,
    job_object,
    page,
)
from tunesmith.service.store import FINAL, Checkpoint, Event, Job, new_id, now
from tunesmith.service.uploads import fits_method

__all__ = ["add", "owned_job"]

EXPORT_FORMATS = {"hf", "peft", "onnx", "gguf"}
EXPORT_SECONDS = 1800


def owned_job(settings: Settings, owner: str, job_id: str) -> Job:
    with settings.store.session() as s:
        job = s.get(Job, job_id)
    if job is None or job.owner != owner:
        raise ApiError(404, f"no fine-tuning job {job_id}", "fine_tuning_job_id", "job_not_found")
    return job


def create_job(settings: Settings, owner: str, body: JobRequest) -> Job:
    method = body.method.type if body.method else "supervised"
    asked = body.method.section().hyperparameters if body.method else (body.hyperparameters or Hyperparameters())
    model_path(body.model, settings.models_dir)  # refuses a model this server does not have
    train = owned_file(settings, owner, body.training_file)
    files = [train]
    if body.validation_file:
        files.append(owned_file(settings, owner, body.validation_file))
    for f, param in zip(files, ("training_file", "validation_file"), strict=False):
        if f.status != "processed":
            raise ApiError(400, f"{f.id} cannot be used: {f.status_details}", param, "invalid_file")
        problem = None if body.tunesmith and "task" in body.tunesmith else fits_method(f.kind, method)
        if problem:
            raise ApiError(400, f"{f.id}: {problem}", param, "invalid_file_format")
    if method == "reinforcement":
        grader = body.method.section().grader if body.method else None
        if grader is None:
            raise ApiError(400, "a reinforcement job needs method.reinforcement.grader", "method.reinforcement.grader")
        from tunesmith.service.graders import validate_grader

        try:
            validate_grader(grader)
        except ValueError as exc:
            raise ApiError(400, str(exc), "method.reinforcement.grader") from None
    mine = _owner_file_paths(settings, owner)
    if body.tunesmith:
        check_extension(body.tunesmith, mine)
    hyper = resolve_hyperparameters(asked, train.rows, method)
    method_body = body.method.model_dump(exclude_none=True) if body.method else {"type": "supervised"}
    job = Job(
        id=new_id("ftjob"),
        owner=owner,
        model=body.model,
        training_file=body.training_file,
        validation_file=body.validation_file,
        suffix=body.suffix,
        seed=body.seed if body.seed is not None else 42,
        meta=body.metadata or {},
        method=method_body,
        hyperparameters=hyper,
        tunesmith=body.tunesmith,
        status="validating_files",
        created_at=now(),
        attempts=0,
    )
    with settings.store.session() as s:
        s.add(job)
        s.flush()  # the job row first: events refer to it
        s.add(_event(job.id, f"Validating training file: {job.training_file}"))
    # The files were checked row by row when they were uploaded, and against the method above.
    with settings.store.session() as s:
        stored = s.get(Job, job.id)
        assert stored is not None
        stored.status = "queued"
        s.add(_event(job.id, "Files validated, moving job to queued state"))
        job = stored
    return job


def _owner_file_paths(settings: Settings, owner: str) -> dict[str, str]:
    from tunesmith.service.store import File

    with settings.store.session() as s:
        return {f.id: f.path for f in s.scalars(select(File).where(File.owner == owner))}


def _event(job_id: str, message: str, level: str = "info") -> Event:
    return Event(id=new_id("ftevent"), job_id=job_id, created_at=now(), level=level, message=message, type="message")


def request_change(settings: Settings, owner: str, job_id: str, action: str) -> Job:
    """Cancel, pause or resume: immediate where no worker holds the job, else a request to its worker."""
    owned_job(settings, owner, job_id)
    with settings.store.session() as s:
        job = s.get(Job, job_id, with_for_update=True)
        assert job is not None
        status = job.status
        if action == "cancel":
            if status in FINAL:
                raise ApiError(400, f"job {job_id} has already {status}", "fine_tuning_job_id", "job_finished")
            if status == "running":
                job.requested = "cancel"
            else:
                job.status, job.finished_at = "cancelled", now()
                s.add(_event(job_id, "Job cancelled"))
        elif action == "pause":
            if status not in ("queued", "running"):
                raise ApiError(
                    400,
                    f"job {job_id} is {status}; only a queued or running job can pause",
                    "fine_tuning_job_id",
                    "job_not_pausable",
                )
            if status == "running":
                job.requested = "pause"
            else:
                job.status = "paused"
                s.add(_event(job_id, "Job paused"))
        else:
            if status != "paused":
                raise ApiError(
                    400,
                    f"job {job_id} is {status}; only a paused job can resume",
                    "fine_tuning_job_id",
                    "job_not_paused",
                )
            job.status = "queued"
            s.add(_event(job_id, "Job resumed; queued to continue from its last checkpoint"))
        return job


def add(app: FastAPI) -> None:
    @app.post("/v1/fine_tuning/jobs")
    def create(body: JobRequest, owner: Owner, settings: Config) -> dict[str, Any]:
        return job_object(create_job(settings, owner, body))

    @app.get("/v1/fine_tuning/jobs")
    def list_jobs(
        request: Request, owner: Owner, settings: Config, after: str | None = None, limit: int = 20
    ) -> dict[str, Any]:
        if not 1 <= limit <= 1000:
            raise ApiError(400, "limit: must be between 1 and 1000", "limit")
        wanted = {k[len("metadata[") : -1]: v for k, v in request.query_params.items() if k.startswith("metadata[")}
        with settings.store.session() as s:
            jobs = list(s.scalars(select(Job).where(Job.owner == owner)))
        jobs = [j for j in jobs if all((j.meta or {}).get(k) == v for k, v in wanted.items())]
        jobs.sort(key=lambda j: j.order_ns, reverse=True)
        chosen, more = cursor_slice(jobs, after, limit)
        return page([job_object(j) for j in chosen], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}")
    def retrieve(job_id: str, owner: Owner, settings: Config) -> dict[str, Any]:
        return job_object(owned_job(settings, owner, job_id))

    for action in ("cancel", "pause", "resume"):

        def change(job_id: str, owner: Owner, settings: Config, action: str = action) -> dict[str, Any]:
            return job_object(request_change(settings, owner, job_id, action))

        app.post(f"/v1/fine_tuning/jobs/{{job_id}}/{action}", name=f"{action}_job")(change)

    @app.get("/v1/fine_tuning/jobs/{job_id}/events")
    def events(
        job_id: str, owner: Owner, settings: Config, after: str | None = None, limit: int = 20, type: str | None = None
    ) -> dict[str, Any]:
        owned_job(settings, owner, job_id)
        if not 1 <= limit <= 10000:
            raise ApiError(400, "limit: must be between 1 and 10000", "limit")
        with settings.store.session() as s:
            query = select(Event).where(Event.job_id == job_id)
            if after is not None:
                cursor = s.scalar(select(Event.seq).where(Event.id == after, Event.job_id == job_id))
                if cursor is None:
                    raise ApiError(400, f"after={after!r}: not an event of this job", "after")
                query = query.where(Event.seq < cursor)
            if type is not None:
                query = query.where(Event.type == type)
            rows = list(s.scalars(query.order_by(Event.seq.desc()).limit(limit + 1)))
        return page([event_object(e) for e in rows[:limit]], len(rows) > limit)

    @app.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
    def checkpoints(
        job_id: str, owner: Owner, settings: Config, after: str | None = None, limit: int = 10
    ) -> dict[str, Any]:
        owned_job(settings, owner, job_id)
        with settings.store.session() as s:
            rows = list(
                s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc()))
            )
        chosen, more = cursor_slice(rows, after, limit)
        return page([checkpoint_object(c) for c in chosen], more)

    @app.get("/v1/fine_tuning/jobs/{job_id}/report")
    def report(job_id: str, owner: Owner, settings: Config) -> HTMLResponse:
        job = owned_job(settings, owner, job_id)
        run = _run_dir(settings, job)
        page_file = run / "report.html"
        if not page_file.is_file():
            raise ApiError(
                404, f"job {job_id} has no report yet; it is written when training ends", "fine_tuning_job_id"
            )
        return HTMLResponse(page_file.read_text(encoding="utf-8"))

    @app.post("/v1/fine_tuning/jobs/{job_id}/export")
    def export(job_id: str, body: dict[str, Any], owner: Owner, settings: Config) -> dict[str, Any]:
        job = owned_job(settings, owner, job_id)
        fmt, quantize = body.get("format"), body.get("quantize")
        if fmt not in EXPORT_FORMATS:
            raise ApiError(400, f"format: must be one of {', '.join(sorted(EXPORT_FORMATS))}", "format")
        if quantize is not None and not (isinstance(quantize, str) and re.fullmatch(r"[a-z0-9_]{1,10}", quantize)):
            raise ApiError(400, "quantize: must be a name such as int8, f16 or q8_0", "quantize")
        run = _run_dir(settings, job)
        out = settings.data_dir / "exports" / f"{job.id}-{fmt}{'-' + quantize if quantize else ''}"
        if not (out / "export.json").is_file():
            command = [sys.executable, "-m", "tunesmith.cli", "export", str(run), "--format", fmt, "-o", str(out)]
            if quantize:
                command += ["--quantize", quantize]
            done = subprocess.run(command, capture_output=True, text=True, timeout=EXPORT_SECONDS)
            if done.returncode != 0:
                lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
                raise ApiError(
                    400 if done.returncode == 2 else 500,
                    lines[-1] if lines else "export failed",
                    "format",
                    "export_failed",
                )
        facts = json.loads((out / "export.json").read_text())["export"]
        return {
            "object": "tunesmith.export",
            "job": job.id,
            "format": fmt,
            "quantize": quantize,
            "path": str(out.relative_to(settings.data_dir)),  # on the server, under its data directory
            "size_bytes": facts.get("size_bytes"),
            "parity": facts.get("parity"),
        }


def _run_dir(settings: Settings, job: Job):  # type: ignore[no-untyped-def]
    if job.status != "succeeded" or not job.run_dir:
        raise ApiError(
            400, f"job {job.id} is {job.status}; this needs a succeeded job", "fine_tuning_job_id", "job_not_succeeded"
        )
    return settings.data_dir / job.run_dir
