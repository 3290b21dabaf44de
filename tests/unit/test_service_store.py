"""The service's store: migrations, hashed keys, and job claims that never give one job to two workers.

Each test runs on SQLite and, where `TUNESMITH_TEST_POSTGRES_URL` names a PostgreSQL database that the
tests may empty (`.ci/run` starts one), on PostgreSQL too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from tunesmith.service.migrate import current_revision
from tunesmith.service.store import Job, Key, Store, new_id, now

POSTGRES = os.environ.get("TUNESMITH_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A store URL: SQLite in tmp_path, or a schema of its own in the PostgreSQL test database (so
    tests in parallel processes, or two CI runs on one server, never see each other's tables)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'tunesmith.db'}"
        return
    if not POSTGRES:
        pytest.skip("PostgreSQL: set TUNESMITH_TEST_POSTGRES_URL to a database the tests may use (.ci/run does)")
    schema = f"test_{uuid.uuid4().hex[:12]}"
    admin = Store(POSTGRES).engine
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))
    yield f"{POSTGRES}{'&' if '?' in POSTGRES else '?'}options=-csearch_path%3D{schema}"
    with admin.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


def make_store(url: str) -> Store:
    store = Store(url)
    store.migrate()
    return store


def add_jobs(store: Store, owner: str, n: int) -> list[str]:
    ids = []
    with store.session() as s:
        for i in range(n):
            job = Job(
                id=new_id("ftjob"),
                owner=owner,
                model="m",
                training_file="file-x",
                seed=0,
                meta={},
                method={"type": "supervised"},
                hyperparameters={},
                status="queued",
                created_at=now() + i,
                attempts=0,
            )
            s.add(job)
            ids.append(job.id)
    return ids


def owner_of(store: Store) -> str:
    store.create_key("tests")
    with store.session() as s:
        return s.scalars(select(Key.id)).one()


def test_migrations_create_the_schema_once_and_are_idempotent(url: str) -> None:
    store = make_store(url)
    store.migrate()  # a second start changes nothing
    assert current_revision(store.engine) == "0002"
    tables = set(inspect(store.engine).get_table_names())
    assert {"api_keys", "files", "jobs", "events", "checkpoints", "alembic_version"} <= tables
    if url.startswith("sqlite"):
        with store.engine.connect() as c:
            assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_an_older_store_is_upgraded_in_place_and_keeps_its_rows(url: str) -> None:
    from tunesmith.service.migrate import upgrade

    store = Store(url)
    upgrade(store.engine, "0001")  # the first schema, before jobs recorded their task's output
    assert "output" not in {c["name"] for c in inspect(store.engine).get_columns("jobs")}
    with store.engine.begin() as c:
        c.execute(text("INSERT INTO api_keys (id, name, digest, created_at) VALUES ('key-1', 'old', 'd', 0)"))
        c.execute(
            text(
                "INSERT INTO jobs (id, owner, model, training_file, seed, meta, method, hyperparameters, status, "
                "created_at, attempts, order_ns) VALUES ('ftjob-1', 'key-1', 'm', 'file-1', 0, '{}', "
                "'{\"type\": \"supervised\"}', '{}', 'succeeded', 0, 1, 0)"
            )
        )
    store.migrate()
    assert current_revision(store.engine) == "0002"
    with store.session() as s:
        job = s.get(Job, "ftjob-1")
        assert job is not None and job.status == "succeeded" and job.output is None


def test_keys_are_stored_hashed_and_resolve_to_their_owner(url: str, tmp_path: Path) -> None:
    store = make_store(url)
    secret = store.create_key("alice")
    assert secret.startswith("ts-") and len(secret) > 40
    with store.session() as s:
        key = s.scalars(select(Key)).one()
    assert secret not in key.digest and key.digest != secret
    assert store.key_owner(secret) == key.id
    assert store.key_owner(secret + "x") is None
    with pytest.raises(ValueError, match="exists"):
        store.create_key("alice")
    if url.startswith("sqlite"):
        raw = (tmp_path / "tunesmith.db").read_bytes() + (tmp_path / "tunesmith.db-wal").read_bytes()
        assert secret.encode() not in raw


def test_a_job_is_claimed_by_one_worker_only(url: str) -> None:
    store = make_store(url)
    owner = owner_of(store)
    ids = add_jobs(store, owner, 6)
    claimed: list[tuple[str, str]] = []
    lock = threading.Lock()

    def worker(name: str) -> None:
        while (job := store.claim(name, 60)) is not None:
            with lock:
                claimed.append((name, job.id))

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j for _, j in claimed) == sorted(ids)  # every job once, none twice


def test_claims_across_processes_never_overlap(url: str) -> None:
    store = make_store(url)
    ids = add_jobs(store, owner_of(store), 12)
    script = (
        "import sys; from tunesmith.service.store import Store\n"
        "s = Store(sys.argv[1])\n"
        "while (j := s.claim(sys.argv[2], 60)) is not None: print(j.id, flush=True)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, url, f"p{i}"], stdout=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    got = [line for p in procs for line in p.communicate(timeout=60)[0].split()]
    assert sorted(got) == sorted(ids)


def test_a_job_whose_lease_ran_out_is_claimed_again(url: str) -> None:
    store = make_store(url)
    (job_id,) = add_jobs(store, owner_of(store), 1)
    first = store.claim("dead", 0.2)
    assert first is not None and first.attempts == 1
    assert store.claim("other", 60) is None  # still held
    time.sleep(0.3)
    again = store.claim("other", 60)
    assert again is not None and again.id == job_id and again.attempts == 2 and again.worker == "other"
    assert store.renew(job_id, "dead", 60) is None  # the old holder lost it and cannot renew
    assert not store.release(job_id, "dead", status="succeeded")  # nor finish it
    assert store.release(job_id, "other", status="succeeded")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["serve", "--db", "nonsense"], "--db nonsense: not a database URL"),
        (["worker", "--db", "postgresql+psycopg://u:p@127.0.0.1:1/x"], "cannot open the store"),
        (["keys", "create", "a", "--data-dir", "/proc/no-such-place"], "cannot use the data directory"),
    ],
)
def test_a_store_that_cannot_open_is_one_line_and_exit_2(args: list[str], words: str) -> None:
    done = subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert words in done.stderr and "Traceback" not in done.stderr
