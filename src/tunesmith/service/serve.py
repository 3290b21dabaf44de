"""`tunesmith serve`: the store migrated, a model host and N workers started as child processes, and
the web app run by uvicorn in this process. `tunesmith worker` runs one worker alone (for more
workers on this or other machines sharing the store and the data directory).

Children die with the server (Linux's parent-death signal): killing the server with SIGKILL stops
them too, and the next start picks the jobs up from the store, each from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

__all__ = ["DEFAULT_DATA_DIR", "open_store", "run_host", "run_worker", "serve"]

DEFAULT_DATA_DIR = Path("tunesmith-data")


def open_store(db: str | None, data_dir: Path):  # type: ignore[no-untyped-def]
    """The store at `db` (default: SQLite in `data_dir`), migrated to the newest schema.

    Raises:
        ConfigError: a URL that names no database this can open, or a server that cannot be reached.
    """
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    from tunesmith.errors import ConfigError
    from tunesmith.service.store import Store

    where = f"--db {db}" if db else f"--data-dir {data_dir}"
    try:
        store = Store(db) if db else Store.in_directory(data_dir)
        store.migrate()
    except (ArgumentError, NoSuchModuleError) as exc:
        raise ConfigError(
            f"{where}: not a database URL ({exc}); give postgresql+psycopg://user:pw@host/db "
            "or sqlite:///path/tunesmith.db"
        ) from None
    except OperationalError as exc:
        reason = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
        raise ConfigError(f"{where}: cannot open the store ({reason})") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot use the data directory ({exc.strerror})") from None
    return store


def serve(
    data_dir: Path = DEFAULT_DATA_DIR,
    db: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    models_dir: Path | None = None,
    max_upload_mb: float = 512,
    lease_seconds: float = 15.0,
) -> None:
    import uvicorn

    from tunesmith.errors import ConfigError
    from tunesmith.service.app import create_app
    from tunesmith.service.deps import Settings

    with socket.socket() as probe:  # said now, in one line, rather than by uvicorn after the children start
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a closed port is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            message = f"--host {host} --port {port}: cannot listen there ({exc.strerror}); choose another port"
            raise ConfigError(message) from None
    store = open_store(db, data_dir)
    if not store.list_keys():
        secret = store.create_key("default")
        print(f"created API key 'default' (shown once, stored hashed): {secret}", flush=True)
    host_port = _free_port()
    common = ["--data-dir", str(data_dir)] + (["--db", db] if db else [])
    common += ["--models", str(models_dir)] if models_dir else []
    worker = ["worker", "--lease-seconds", str(lease_seconds), *common]
    roles = [["host", "--port", str(host_port), *common]] + [worker] * workers
    children = [_child(role) for role in roles]
    stop = threading.Event()
    threading.Thread(target=_supervise, args=(roles, children, stop), daemon=True).start()
    _wait_for(host_port)
    settings = Settings(store, data_dir, models_dir, max_upload_mb, f"http://127.0.0.1:{host_port}")
    print(f"tunesmith: http://{host}:{port}/ (API at /v1; {workers} worker(s); data in {data_dir})", flush=True)
    try:
        # Keep-alive past the clients' polling interval: a connection closed by the server just as a
        # client reuses it fails that client's request.
        uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", timeout_keep_alive=75)
    finally:
        stop.set()
        for child in children:
            child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(10)


def run_worker(data_dir: Path, db: str | None, models_dir: Path | None, lease_seconds: float = 15.0) -> None:
    from tunesmith.service.worker import Worker

    store = open_store(db, data_dir)
    worker = Worker(store, data_dir, models_dir, lease_s=lease_seconds)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    worker.run()


def run_host(data_dir: Path, port: int) -> None:
    import uvicorn

    from tunesmith.service.host import create_host

    uvicorn.run(create_host(data_dir), host="127.0.0.1", port=port, log_level="warning")


def _child(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tunesmith.service.serve", *args], preexec_fn=_die_with_parent)


def _supervise(roles: list[list[str]], children: list[subprocess.Popen], stop: threading.Event) -> None:
    """Start again a model host or worker that died (a worker killed mid-job: its job is claimed again
    when its lease runs out, and continues from its last checkpoint)."""
    while not stop.wait(1.0):
        for i, child in enumerate(children):
            if child.poll() is not None and not stop.is_set():
                print(
                    f"tunesmith: {roles[i][0]} process {child.pid} exited ({child.returncode}); starting another",
                    file=sys.stderr,
                    flush=True,
                )
                children[i] = _child(roles[i])


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    os.setsid()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(port: int, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise RuntimeError(f"the model host did not start on port {port}")


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tunesmith.service.serve")
    parser.add_argument("role", choices=["host", "worker"])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--db")
    parser.add_argument("--models", type=Path)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--lease-seconds", type=float, default=15.0)
    args = parser.parse_args(argv)
    if args.role == "host":
        run_host(args.data_dir, args.port)
    else:
        run_worker(args.data_dir, args.db, args.models, args.lease_seconds)


if __name__ == "__main__":
    main()
