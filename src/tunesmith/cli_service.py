"""`tunesmith serve`, `tunesmith worker` and `tunesmith keys`: the self-hosted fine-tuning service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["keys_app", "serve", "worker"]

keys_app = typer.Typer(no_args_is_help=True, help="API keys of the service (stored hashed).")
console = Console()

DataDir = Annotated[Path, typer.Option("--data-dir", help="Where the store, files and runs live.")]
Db = Annotated[
    str | None,
    typer.Option(help="Store URL (default: SQLite in the data directory), e.g. postgresql+psycopg://user@host/db."),
]
Lease = Annotated[
    float,
    typer.Option(min=1, help="Seconds after which a job whose worker stopped renewing its hold is taken over."),
]
Models = Annotated[
    Path | None,
    typer.Option(
        "--models", help="A folder of base models (one directory each) that jobs may name, besides the packaged ones."
    ),
]


def serve(
    db: Db = None,
    workers: Annotated[int, typer.Option(min=0, help="Worker processes that train jobs.")] = 1,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    data_dir: DataDir = Path("tunesmith-data"),
    models: Models = None,
    max_upload_mb: Annotated[float, typer.Option(help="Largest file accepted by /v1/files.")] = 512,
    lease_seconds: Lease = 15.0,
) -> None:
    """Run the fine-tuning service: the OpenAI fine-tuning API at /v1 and the dashboard at /."""
    from tunesmith.service.serve import serve as run

    run(data_dir, db, host, port, workers, models, max_upload_mb, lease_seconds)


def worker(
    db: Db = None, data_dir: DataDir = Path("tunesmith-data"), models: Models = None, lease_seconds: Lease = 15.0
) -> None:
    """Run one worker that trains the service's jobs (more workers: run this again, here or elsewhere)."""
    from tunesmith.service.serve import run_worker

    run_worker(data_dir, db, models, lease_seconds)


@keys_app.command("create")
def create_key(
    name: Annotated[str, typer.Argument(help="A name for the key (who or what uses it).")],
    db: Db = None,
    data_dir: DataDir = Path("tunesmith-data"),
) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from tunesmith.errors import ConfigError
    from tunesmith.service.serve import open_store

    try:
        secret = open_store(db, data_dir).create_key(name)
    except ValueError as exc:
        raise ConfigError(f"keys create {name}: {exc}") from None
    console.print(secret, markup=False, highlight=False)


@keys_app.command("list")
def list_keys(db: Db = None, data_dir: DataDir = Path("tunesmith-data")) -> None:
    """The names of the API keys (never the keys)."""
    from tunesmith.service.serve import open_store

    for key in open_store(db, data_dir).list_keys():
        console.print(f"{key.id}  {key.name}", markup=False, highlight=False)
