"""The OpenAI fine-tuning API's wire format: request bodies (pydantic) and the objects the `openai`
client reads back, rendered from the store's rows. Field names follow the current client
(`openai.types.fine_tuning.FineTuningJob`, `FineTuningJobEvent`, `FineTuningJobCheckpoint`,
`openai.types.FileObject`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunesmith.service.store import Checkpoint, Event, File, Job

__all__ = [
    "OPENAI_METHODS",
    "ApiError",
    "ChatRequest",
    "CompletionRequest",
    "JobRequest",
    "OpenAIMethod",
    "checkpoint_object",
    "event_object",
    "file_object",
    "job_object",
    "page",
]

Auto = Literal["auto"]


@dataclass(frozen=True)
class OpenAIMethod:
    """What a job of one OpenAI `method.type` trains in tunesmith."""

    task: str  # the tunesmith task it runs
    reads: tuple[str, ...]  # the kinds of uploaded rows it takes (see uploads.py)
    settings: dict[str, str] = field(default_factory=dict)  # its own hyperparameters -> run-config paths
    defaults: dict[str, float] = field(default_factory=dict)  # their values for "auto"


# OpenAI's method types are its wire vocabulary; two of them happen to share their names with
# tunesmith's tasks. This table is the one place that translates them.
OPENAI_METHODS = {
    "supervised": OpenAIMethod("sft", ("chat", "prompt_completion")),
    "dpo": OpenAIMethod("dpo", ("preference",), {"beta": "dpo.beta"}, {"beta": 0.1}),
    "reinforcement": OpenAIMethod("rl", ("chat", "prompt_completion")),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def type(self) -> str:
        return {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Body):
    n_epochs: int | Auto = Field("auto", description="Passes over the training file (1-50).")
    batch_size: int | Auto = Field("auto", description="Rows per optimizer step (1-256).")
    learning_rate_multiplier: float | Auto = Field("auto", description="Times the method's default learning rate.")
    beta: float | Auto | None = Field(None, description="DPO: the strength of the pull towards the reference.")
    # Reinforcement's own knobs (accepted so a request written for OpenAI is not refused; mapped
    # where tunesmith has the setting, recorded otherwise).
    compute_multiplier: float | Auto | None = None
    eval_interval: int | Auto | None = None
    eval_samples: int | Auto | None = None
    reasoning_effort: str | None = None


class MethodSection(_Body):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    grader: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None


class Method(_Body):
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: MethodSection | None = None
    dpo: MethodSection | None = None
    reinforcement: MethodSection | None = None

    def section(self) -> MethodSection:
        return getattr(self, self.type) or MethodSection()


class JobRequest(_Body):
    model: str = Field(min_length=1, max_length=500)
    training_file: str = Field(min_length=1, max_length=40)
    validation_file: str | None = Field(None, max_length=40)
    suffix: str | None = Field(None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # the older, top-level place; same meaning as supervised's
    integrations: list[dict[str, Any]] | None = None
    tunesmith: dict[str, Any] | None = Field(None, description="A tunesmith run config, merged over the derived one.")


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Generation(BaseModel):
    model_config = ConfigDict(extra="ignore")  # tools, logprobs, ... are not supported and ignored
    model: str
    max_tokens: int | None = Field(None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(None, ge=1, le=4096)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class ChatRequest(_Generation):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Generation):
    prompt: str | list[str]


def page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A cursor page as the client reads it: `{object: list, data, has_more, first_id, last_id}`."""
    return {
        "object": "list",
        "data": data,
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


def file_object(f: File) -> dict[str, Any]:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": f.status,
        "status_details": f.status_details,
        "expires_at": None,
    }


def job_object(job: Job) -> dict[str, Any]:
    method = dict(job.method)
    section = dict(method.get(method["type"]) or {})
    section["hyperparameters"] = job.hyperparameters
    method[method["type"]] = section
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": job.created_at,
        "error": job.error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": job.finished_at,
        "hyperparameters": {k: job.hyperparameters[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "model": job.model,
        "organization_id": "org-tunesmith",
        "result_files": [],
        "seed": job.seed,
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": None,
        "integrations": [],
        "metadata": job.meta or None,
        "method": method,
        "user_provided_suffix": job.suffix,
        "tunesmith": {
            "progress": job.progress,
            "config": job.tunesmith,
            "attempts": job.attempts,
            "output": job.output,
        },
    }


def event_object(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "type": e.type,
        "data": e.data,
    }


def checkpoint_object(c: Checkpoint) -> dict[str, Any]:
    return {
        "id": c.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": c.model_id,
        "fine_tuning_job_id": c.job_id,
        "metrics": {"step": c.step, **c.metrics},
        "step_number": c.step,
    }
