"""Routes that use models: `/v1/models`, `/v1/chat/completions` and `/v1/completions` (streamed as
server-sent events when asked) for tuned causal LMs, and tunesmith's `/v1/classifications` for tuned
classifiers. Generation happens in the model host process; this module forwards to it."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field
from sqlalchemy import select

from tunesmith.service.deps import Config, Owner, Settings
from tunesmith.service.jobs import available_models
from tunesmith.service.openai_schema import ApiError, ChatRequest, CompletionRequest, page
from tunesmith.service.store import Job

__all__ = ["add"]

HOST_TIMEOUT = httpx.Timeout(600.0, connect=5.0)


class ClassifyRequest(BaseModel):
    model: str
    input: str | list[str] = Field(min_length=1)


def tuned_model(settings: Settings, owner: str, model: str) -> Job:
    """The owner's succeeded job whose fine-tuned model is `model`."""
    with settings.store.session() as s:
        job = s.scalar(select(Job).where(Job.owner == owner, Job.fine_tuned_model == model))
    if job is None or job.status != "succeeded" or not job.run_dir:
        base = model in available_models(settings.models_dir)
        hint = (
            "base models are for fine-tuning; use a fine-tuned model id (ft:...)"
            if base
            else ("GET /v1/models lists the models you can use")
        )
        raise ApiError(404, f"model {model!r} is not a fine-tuned model of yours; {hint}", "model", "model_not_found")
    return job


def add(app: FastAPI) -> None:
    @app.get("/v1/models")
    def models(owner: Owner, settings: Config) -> dict[str, Any]:
        data = [_model(name, 0, "tunesmith") for name in available_models(settings.models_dir)]
        with settings.store.session() as s:
            jobs = s.scalars(select(Job).where(Job.owner == owner, Job.status == "succeeded").order_by(Job.order_ns))
            data += [_model(j.fine_tuned_model or "", j.finished_at or j.created_at, "user") for j in jobs]
        return page(data, False)

    @app.get("/v1/models/{model_id}")
    def model(model_id: str, owner: Owner, settings: Config) -> dict[str, Any]:
        if model_id in available_models(settings.models_dir):
            return _model(model_id, 0, "tunesmith")
        job = tuned_model(settings, owner, model_id)
        return _model(model_id, job.finished_at or job.created_at, "user")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, owner: Owner, settings: Config) -> Any:
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        return await _complete(settings, owner, body, messages, chat=True)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, owner: Owner, settings: Config) -> Any:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "prompt: give one prompt per request", "prompt")
        return await _complete(settings, owner, body, prompts[0], chat=False)

    @app.post("/v1/classifications")
    async def classify(body: ClassifyRequest, owner: Owner, settings: Config) -> dict[str, Any]:
        job = tuned_model(settings, owner, body.model)
        if job.output != "label":
            raise ApiError(400, f"model {body.model!r} gives {job.output}, not labels; see /v1/models", "model")
        texts = [body.input] if isinstance(body.input, str) else body.input
        async with httpx.AsyncClient(timeout=HOST_TIMEOUT) as client:
            reply = await client.post(
                f"{_host(settings)}/predict", json={"run": str(settings.data_dir / (job.run_dir or "")), "texts": texts}
            )
        answer = reply.json()
        if reply.status_code != 200:
            raise ApiError(400, answer.get("error", "classification failed"), "input")
        return {
            "object": "list",
            "model": body.model,
            "data": [{"object": "classification", "index": i, **p} for i, p in enumerate(answer["data"])],
        }


def _model(name: str, created: int, owned_by: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owned_by}


def _text(content: Any) -> str:
    if isinstance(content, list):  # content parts: the text ones, joined
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def _host(settings: Settings) -> str:
    if not settings.host_url:
        raise ApiError(503, "this server runs no model host; start it with `tunesmith serve`", code="no_model_host")
    return settings.host_url


async def _complete(settings: Settings, owner: str, body: Any, prompt: Any, chat: bool) -> Any:
    job = tuned_model(settings, owner, body.model)
    if job.output != "text":
        raise ApiError(400, f"model {body.model!r} gives a {job.output}, not text; use /v1/classifications", "model")
    request = {
        "run": str(settings.data_dir / (job.run_dir or "")),
        "prompt": prompt,
        "max_new_tokens": body.max_completion_tokens or body.max_tokens or 64,
        "temperature": body.temperature or 0.0,
        "top_p": body.top_p or 1.0,
        "seed": body.seed or 0,
    }
    ident = ("chatcmpl-" if chat else "cmpl-") + job.id.split("-", 1)[1][:8] + f"{time.time_ns():x}"[-10:]
    pieces = _pieces(_host(settings), request)
    if body.stream:
        return StreamingResponse(_events(pieces, ident, body.model, chat), media_type="text/event-stream")
    final: dict[str, Any] = {}
    async for piece in pieces:
        if piece.get("done"):
            final = piece
    created = int(time.time())
    usage = {
        "prompt_tokens": final["prompt_tokens"],
        "completion_tokens": final["completion_tokens"],
        "total_tokens": final["prompt_tokens"] + final["completion_tokens"],
    }
    if chat:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": final["text"]},
            "finish_reason": final["finish_reason"],
            "logprobs": None,
        }
        return {
            "id": ident,
            "object": "chat.completion",
            "created": created,
            "model": body.model,
            "choices": [choice],
            "usage": usage,
        }
    choice = {"index": 0, "text": final["text"], "finish_reason": final["finish_reason"], "logprobs": None}
    return {
        "id": ident,
        "object": "text_completion",
        "created": created,
        "model": body.model,
        "choices": [choice],
        "usage": usage,
    }


async def _pieces(host: str, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The host's answer, piece by piece; its error becomes an ApiError before anything is sent."""
    async with (
        httpx.AsyncClient(timeout=HOST_TIMEOUT) as client,
        client.stream("POST", f"{host}/generate", json=request) as reply,
    ):
        async for line in reply.aiter_lines():
            if not line.strip():
                continue
            piece = json.loads(line)
            if "error" in piece:
                raise ApiError(500, f"generation failed: {piece['error']}", code="generation_failed")
            yield piece


async def _events(pieces: AsyncIterator[dict[str, Any]], ident: str, model: str, chat: bool) -> AsyncIterator[str]:
    """Server-sent events as the client reads them: chunks, then `data: [DONE]`."""
    created = int(time.time())
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            content: dict[str, Any] = (
                {"role": "assistant", "content": ""} if first else ({"content": delta} if delta is not None else {})
            )
            choice: dict[str, Any] = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        data = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(data)}\n\n"

    if chat:
        yield chunk(None, None, first=True)
    try:
        async for piece in pieces:
            if piece.get("done"):
                yield chunk(None, piece["finish_reason"])
            elif piece.get("delta"):
                yield chunk(piece["delta"], None)
    except ApiError as exc:  # the stream has begun: the error goes as an event of its own
        yield f"data: {json.dumps(exc.body())}\n\n"
    yield "data: [DONE]\n\n"
