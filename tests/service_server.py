"""A real `tunesmith serve` in a subprocess, for the service's tests: a base model folder with the tiny
Llama, an API key made with `tunesmith keys create`, and helpers to wait for jobs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TUNESMITH = [sys.executable, "-m", "tunesmith.cli"]
WORDS = ["red", "blue", "green", "cat", "dog"]


def chat_rows(n: int = 40) -> list[dict[str, Any]]:
    """Chat rows whose answer is the word the user asks for (learnable by a tiny model)."""
    return [
        {"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
        for w in (WORDS * n)[:n]
    ]


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def create_key(data_dir: Path, name: str, db: str | None = None) -> str:
    args = [*TUNESMITH, "keys", "create", name, "--data-dir", str(data_dir)] + (["--db", db] if db else [])
    done = subprocess.run(args, capture_output=True, text=True, check=True, env=_env())
    return done.stdout.strip()


@dataclass
class Server:
    data_dir: Path
    models: Path
    port: int
    db: str | None = None
    workers: int = 1
    process: subprocess.Popen | None = None
    log: Path | None = None
    extra: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        self.log = self.data_dir.parent / f"serve-{self.port}-{time.time_ns()}.log"
        args = [
            *TUNESMITH,
            "serve",
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--data-dir",
            str(self.data_dir),
            "--models",
            str(self.models),
            "--lease-seconds",
            "3",
            *self.extra,
        ]
        args += ["--db", self.db] if self.db else []
        self.process = subprocess.Popen(args, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=_env())
        deadline = time.time() + 90
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tunesmith serve exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"tunesmith serve did not listen: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL the server (its model host and workers die with it)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, key: str) -> Any:
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)


def start_server(tmp: Path, tiny_llama: Path, workers: int = 1, db: str | None = None) -> tuple[Server, str]:
    """A running server over `tmp/data` whose base model `tiny-llama` is the tiny Llama, and a key."""
    models = tmp / "models"
    models.mkdir(exist_ok=True)
    if not (models / "tiny-llama").exists():
        (models / "tiny-llama").symlink_to(tiny_llama)
    data = tmp / "data"
    key = create_key(data, f"key-{time.time_ns()}", db)
    return Server(data, models, free_port(), db=db, workers=workers).start(), key


def wait_for(client: Any, job_id: str, statuses: tuple[str, ...], seconds: float = 240) -> Any:
    deadline = time.time() + seconds
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {seconds} s")


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
