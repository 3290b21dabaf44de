"""The HTTP face: FastAPI routes speaking the OpenAI fine-tuning API (files, jobs, events, checkpoints,
models, chat and text completions) plus tunesmith's extensions (report, classify, export), and the
dashboard at `/`. No route imports torch: training runs in worker processes and generation in the
model host process (`host.py`), which this app reaches over loopback HTTP.

Every object belongs to the API key that made it; a key reaches only its own (another key's object is
answered 404, as if it did not exist). Paths on disk are made by the server from ids it generated.
"""

from __future__ import annotations

import os
import secrets
import traceback
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy import select
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.service import routes_jobs, routes_models
from tunesmith.service.deps import Config, Owner, Settings, cursor_slice, owned_file
from tunesmith.service.openai_schema import ApiError, file_object, page
from tunesmith.service.store import File as FileRow
from tunesmith.service.store import Job, new_id, now
from tunesmith.service.uploads import check_upload

__all__ = ["Settings", "create_app"]

STATIC = Path(__file__).with_name("static")
CHUNK = 1 << 20


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(title="tunesmith", version="1", docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    _errors(app)

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    files_routes(app)
    routes_jobs.add(app)
    routes_models.add(app)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")

        @app.get("/", include_in_schema=False)
        def dashboard() -> HTMLResponse:
            return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"))

    return app


def files_routes(app: FastAPI) -> None:
    @app.post("/v1/files")
    def upload(
        owner: Owner, settings: Config, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form()]
    ) -> dict[str, Any]:
        if purpose != "fine-tune":
            raise ApiError(400, f"purpose={purpose!r}: this server stores fine-tune files only", "purpose")
        file_id = new_id("file")
        relative = Path("files") / f"{file_id}.jsonl"  # the server's name, never the client's
        target = settings.data_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        size = _save_upload(file, target, settings.max_upload_bytes)
        verdict = check_upload(target)
        name = os.path.basename(file.filename or "upload.jsonl")[:500]
        row = FileRow(
            id=file_id,
            owner=owner,
            filename=name,
            purpose=purpose,
            bytes=size,
            created_at=now(),
            status="error" if verdict.error else "processed",
            status_details=verdict.error,
            kind=verdict.kind,
            rows=verdict.rows,
            path=str(relative),
        )
        with settings.store.session() as s:
            s.add(row)
        return file_object(row)

    @app.get("/v1/files")
    def list_files(
        owner: Owner,
        settings: Config,
        after: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
        order: str = "desc",
        purpose: str | None = None,
    ) -> dict[str, Any]:
        if order not in ("asc", "desc"):
            raise ApiError(400, "order: must be asc or desc", "order")
        with settings.store.session() as s:
            query = select(FileRow).where(FileRow.owner == owner)
            if purpose:
                query = query.where(FileRow.purpose == purpose)
            rows = list(s.scalars(query))
        rows.sort(key=lambda f: f.order_ns, reverse=order == "desc")
        chosen, more = cursor_slice(rows, after, limit)
        return page([file_object(f) for f in chosen], more)

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, owner: Owner, settings: Config) -> dict[str, Any]:
        return file_object(owned_file(settings, owner, file_id))

    @app.get("/v1/files/{file_id}/content")
    def content(file_id: str, owner: Owner, settings: Config) -> FileResponse:
        row = owned_file(settings, owner, file_id)
        return FileResponse(settings.data_dir / row.path, media_type="application/octet-stream", filename=row.filename)

    @app.delete("/v1/files/{file_id}")
    def delete_file(file_id: str, owner: Owner, settings: Config) -> dict[str, Any]:
        row = owned_file(settings, owner, file_id)
        with settings.store.session() as s:
            users = s.scalar(
                select(Job.id).where(
                    Job.owner == owner,
                    Job.status.in_(("validating_files", "queued", "running", "paused")),
                    (Job.training_file == file_id) | (Job.validation_file == file_id),
                )
            )
            if users is not None:
                raise ApiError(409, f"file {file_id} is used by job {users}, which has not finished", "file_id")
            s.delete(s.get(FileRow, file_id))
        (settings.data_dir / row.path).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}


def _save_upload(upload: UploadFile, target: Path, limit: int) -> int:
    """Stream the upload to `target` (atomically), refusing it past `limit` bytes."""
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    size = 0
    try:
        with tmp.open("wb") as out:
            while block := upload.file.read(CHUNK):
                size += len(block)
                if size > limit:
                    raise ApiError(
                        413,
                        f"the file is larger than this server's limit of {limit / (1 << 20):g} MB",
                        "file",
                        "file_too_large",
                    )
                out.write(block)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return size


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form"))
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg"))
        return JSONResponse(ApiError(400, message, where or None).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = "no such route; the API is under /v1" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse(ApiError(exc.status_code, message).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    def crash(_request: Request, exc: Exception) -> Response:
        # An unexpected failure answers 500 in OpenAI's shape, is logged, and the server stays up.
        traceback.print_exception(exc)
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)
