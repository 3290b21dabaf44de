"""The service's store: API keys, files, jobs, their events and checkpoints, in SQLAlchemy 2.

SQLite in WAL mode by default (one file in the data directory, safe for a web process and several
worker processes on one machine); PostgreSQL by URL for teams whose workers run on several machines.
The schema is created and upgraded by Alembic (`migrations/`). Every function takes the owner (the
API key's id) where an object belongs to one, so a key never reaches another key's objects.

Workers claim jobs with one conditional UPDATE (`status` and lease checked in the WHERE clause), which
is atomic on both engines: two workers never run one job, and a job whose worker died (its lease ran
out) is claimed again and resumes from its checkpoint.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, BigInteger, ForeignKey, Integer, String, Text, create_engine, event, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

__all__ = [
    "ACTIVE",
    "FINAL",
    "Base",
    "Checkpoint",
    "Event",
    "File",
    "Job",
    "Key",
    "Store",
    "new_id",
    "now",
]

FINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running", "paused")
KEY_CACHE_SECONDS = 60.0


def now() -> int:
    return int(time.time())


def new_id(prefix: str) -> str:
    """OpenAI-style object ids: `file-…`, `ftjob-…`, `ftevent-…`, `ftckpt-…`."""
    return f"{prefix}-{secrets.token_hex(12)}"


class Base(DeclarativeBase):
    pass


class Key(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # sha256 of a 256-bit random secret: a slow password hash buys nothing against a random key.
    digest: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)


class File(Base):
    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    filename: Mapped[str] = mapped_column(String(500))
    purpose: Mapped[str] = mapped_column(String(40))
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20))  # processed | error
    status_details: Mapped[str | None] = mapped_column(Text, nullable=True)
    kind: Mapped[str | None] = mapped_column(String(40), nullable=True)  # chat, prompt_completion, preference, ...
    rows: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(Text)  # relative to the data directory, chosen by the server
    order_ns: Mapped[int] = mapped_column(BigInteger, default=time.time_ns, index=True)  # list order


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model: Mapped[str] = mapped_column(String(500))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), nullable=True)
    suffix: Mapped[str | None] = mapped_column(String(64), nullable=True)
    seed: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    method: Mapped[dict[str, Any]] = mapped_column(JSON)  # {type, <type>: {hyperparameters, ...}}, as asked
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON)  # resolved ("auto" replaced), as shown
    tunesmith: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # the extension config
    status: Mapped[str] = mapped_column(String(20), index=True)
    requested: Mapped[str | None] = mapped_column(String(10), nullable=True)  # cancel | pause, for the worker
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[int] = mapped_column(BigInteger, index=True)
    finished_at: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(300), nullable=True, index=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # {step, steps}
    output: Mapped[str | None] = mapped_column(String(20), nullable=True)  # the task's output: text, label, ...
    run_dir: Mapped[str | None] = mapped_column(Text, nullable=True)  # relative to the data directory
    worker: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_until: Mapped[float | None] = mapped_column(nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    order_ns: Mapped[int] = mapped_column(BigInteger, default=time.time_ns, index=True)  # list order


class Event(Base):
    __tablename__ = "events"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    created_at: Mapped[int] = mapped_column(BigInteger)
    level: Mapped[str] = mapped_column(String(10))
    message: Mapped[str] = mapped_column(Text)
    type: Mapped[str] = mapped_column(String(10))  # message | metrics
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Where a metrics event came from (run directory name, line of its metrics.jsonl), so a worker
    # that takes over a job copies on from the last line copied and never twice.
    source_run: Mapped[str | None] = mapped_column(String(100), nullable=True)
    source_line: Mapped[int | None] = mapped_column(Integer, nullable=True)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[int] = mapped_column(BigInteger)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON)
    model_id: Mapped[str] = mapped_column(String(300))


class Store:
    """The engine and sessions over one database URL (`sqlite:///…` or `postgresql+psycopg://…`)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._owners: dict[str, tuple[str, float]] = {}

    @classmethod
    def in_directory(cls, data_dir: Path) -> Store:
        data_dir.mkdir(parents=True, exist_ok=True)
        return cls(f"sqlite:///{(data_dir / 'tunesmith.db').resolve()}")

    def migrate(self) -> None:
        """Create or upgrade the schema to the newest Alembic revision."""
        from tunesmith.service.migrate import upgrade

        upgrade(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions.begin() as session:
            yield session

    # --- keys -------------------------------------------------------------------------------

    def create_key(self, name: str) -> str:
        """A new API key called `name`; returns the secret, which is shown once and stored hashed."""
        secret = "ts-" + secrets.token_urlsafe(32)
        with self.session() as s:
            if s.scalar(select(Key).where(Key.name == name)) is not None:
                raise ValueError(f"an API key named {name!r} exists; choose another name")
            s.add(Key(id=new_id("key"), name=name, digest=_digest(secret), created_at=now()))
        return secret

    def key_owner(self, secret: str) -> str | None:
        """The id of the key `secret`, or None. Known keys are remembered for KEY_CACHE_SECONDS (every
        request asks; keys are never changed, only created)."""
        digest = _digest(secret)
        hit = self._owners.get(digest)
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        with self.session() as s:
            owner = s.scalar(select(Key.id).where(Key.digest == digest))
        if owner is not None:
            self._owners[digest] = (owner, time.monotonic() + KEY_CACHE_SECONDS)
        return owner

    def list_keys(self) -> list[Key]:
        with self.session() as s:
            return list(s.scalars(select(Key).order_by(Key.created_at)))

    # --- claims by workers ------------------------------------------------------------------

    def claim(self, worker: str, lease_s: float) -> Job | None:
        """The oldest queued job (or a running one whose worker's lease ran out), now this worker's."""
        t = time.time()
        with self.session() as s:
            candidates = s.scalars(
                select(Job.id)
                .where((Job.status == "queued") | ((Job.status == "running") & (Job.lease_until < t)))
                .order_by(Job.order_ns)
                .limit(8)
            ).all()
        for job_id in candidates:
            with self.session() as s:
                won = s.execute(
                    update(Job)
                    .where(Job.id == job_id)
                    .where((Job.status == "queued") | ((Job.status == "running") & (Job.lease_until < t)))
                    .values(status="running", worker=worker, lease_until=t + lease_s, attempts=Job.attempts + 1)
                    .execution_options(synchronize_session=False)
                )
                if won.rowcount == 1:  # type: ignore[attr-defined]
                    return s.get(Job, job_id)
        return None

    def renew(self, job_id: str, worker: str, lease_s: float) -> Job | None:
        """Extend this worker's lease; None if the job is no longer this worker's."""
        with self.session() as s:
            kept = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker, Job.status == "running")
                .values(lease_until=time.time() + lease_s)
                .execution_options(synchronize_session=False)
            )
            return s.get(Job, job_id) if kept.rowcount == 1 else None  # type: ignore[attr-defined]

    def release(self, job_id: str, worker: str, **values: Any) -> bool:
        """Set `values` on a job this worker holds, and let go of it."""
        with self.session() as s:
            done = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.worker == worker)
                .values(worker=None, lease_until=None, **values)
                .execution_options(synchronize_session=False)
            )
            return done.rowcount == 1  # type: ignore[attr-defined]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        return create_engine(url, pool_pre_ping=True, future=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _pragmas(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never block the writer, and the reverse
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint of the WAL; safe in WAL mode
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine
