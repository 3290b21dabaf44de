"""Schema migrations with Alembic, run from code: `tunesmith serve` and `tunesmith worker` upgrade the
store to the newest revision before they use it (the revisions are in `migrations/versions/`).

To add a revision after changing `store.py`:
`alembic -c src/tunesmith/service/migrations/alembic.ini revision --autogenerate -m "what changed"`.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine

__all__ = ["MIGRATIONS", "current_revision", "upgrade"]

MIGRATIONS = Path(__file__).with_name("migrations")


def _config(connection):  # type: ignore[no-untyped-def]
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()
