"""Alembic's environment: the connection comes from `tunesmith.service.migrate` (or, for the
`alembic` command line, from `sqlalchemy.url` in alembic.ini)."""

from alembic import context
from sqlalchemy import engine_from_config, pool

from tunesmith.service.store import Base

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = engine_from_config(config.get_section(config.config_ini_section) or {}, poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()


run()
