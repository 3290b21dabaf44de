"""What every route needs: the app's settings, the caller's API key, owned objects, cursor pages."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request

from tunesmith.service.openai_schema import ApiError
from tunesmith.service.store import File as FileRow
from tunesmith.service.store import Store

__all__ = ["Config", "Owner", "Settings", "cursor_slice", "owned_file", "owner_of", "settings_of"]


class Settings:
    """What the app serves from: the store, the data directory, base models, limits, the model host."""

    def __init__(
        self,
        store: Store,
        data_dir: Path,
        models_dir: Path | None = None,
        max_upload_mb: float = 512,
        host_url: str | None = None,
    ) -> None:
        self.store, self.data_dir, self.models_dir = store, data_dir.resolve(), models_dir
        self.max_upload_bytes = int(max_upload_mb * (1 << 20))
        self.host_url = host_url


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def owner_of(request: Request) -> str:
    """The API key's id, from `Authorization: Bearer <key>`; 401 without a valid key."""
    header = request.headers.get("authorization", "")
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise ApiError(
            401,
            "no API key given; send Authorization: Bearer <key> (`tunesmith keys create NAME`)",
            code="missing_api_key",
        )
    owner = settings_of(request).store.key_owner(secret.strip())
    if owner is None:
        raise ApiError(401, "the API key is not valid", code="invalid_api_key")
    return owner


Owner = Annotated[str, Depends(owner_of)]
Config = Annotated[Settings, Depends(settings_of)]


def owned_file(settings: Settings, owner: str, file_id: str) -> FileRow:
    with settings.store.session() as s:
        row = s.get(FileRow, file_id)
    if row is None or row.owner != owner:
        raise ApiError(404, f"no file {file_id}", "file_id", "file_not_found")
    return row


def cursor_slice(rows: list[Any], after: str | None, limit: int) -> tuple[list[Any], bool]:
    """The page after the object `after` (an id from the previous page) and whether more follow."""
    if after is not None:
        ids = [r.id for r in rows]
        if after not in ids:
            raise ApiError(400, f"after={after!r}: not an id in this list", "after")
        rows = rows[ids.index(after) + 1 :]
    return rows[:limit], len(rows) > limit
