"""Run directories (DESIGN §8): resolved config, manifest, metrics log, checkpoints, final weights.

Every file that matters is written atomically (temp file + rename), so a crash never leaves a
half-written file that a later run trusts.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, TextIO

import yaml

from tunesmith.errors import ConfigError
from tunesmith.machine import cpu_name

__all__ = [
    "Run",
    "atomic_write_text",
    "atomic_writer",
    "config_hash",
    "create_run",
    "file_sha256",
    "list_runs",
    "memory_now",
    "open_or_create",
    "open_run",
    "peak_rss_mb",
    "read_json",
    "write_json",
    "write_jsonl",
    "write_manifest",
]

PACKAGES = ("tunesmith", "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy")


@dataclass(frozen=True)
class Run:
    dir: Path

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def final(self) -> Path:
        return self.dir / "final"

    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.dir / "config.yaml").read_text(encoding="utf-8"))

    def log(self, record: dict[str, Any]) -> None:
        """Append one line to metrics.jsonl (flushed, so a crash keeps every line before it)."""
        line = json.dumps({"time": round(time.time(), 3), **record}, default=_jsonable)
        with open(self.dir / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def plan(self) -> dict[str, Any]:
        """plan.json ({} before it is written)."""
        path = self.dir / "plan.json"
        return dict(read_json(path)) if path.is_file() else {}

    def update_plan(self, fields: dict[str, Any]) -> None:
        """Add `fields` to plan.json (atomically), e.g. what the loop decided once training began."""
        write_json(self.dir / "plan.json", self.plan() | fields)

    def metrics(self) -> list[dict[str, Any]]:
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def create_run(parent: str | Path, name: str, config: dict[str, Any]) -> Run:
    """A new `parent/<name>-<timestamp>` directory holding the resolved config.

    Raises:
        ConfigError: `parent` (output.dir) is a file, or a directory cannot be made there.
    """
    parent = Path(parent)
    blocking = next((p for p in (parent, *parent.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"output.dir={parent}: {blocking} is a file, not a directory; give a directory for runs")
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = parent / f"{name}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    try:
        path.mkdir(parents=True)
    except OSError as exc:
        raise ConfigError(f"output.dir={parent}: cannot make the run directory {path} ({exc.strerror})") from None
    atomic_write_text(path / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    return Run(path)


def open_or_create(parent: str | Path, name: str, config: dict[str, Any], resume: str | Path | None) -> Run:
    """The interrupted run `resume` to continue, or a new run directory (see `create_run`)."""
    return open_run(resume) if resume is not None else create_run(parent, name, config)


def open_run(path: str | Path) -> Run:
    run = Run(Path(path))
    if not (run.dir / "config.yaml").is_file():
        raise ConfigError(f"{path}: not a run directory (no config.yaml); `tunesmith runs ls` lists runs")
    return run


def list_runs(parent: str | Path) -> list[Run]:
    root = Path(parent)
    if not root.is_dir():
        return []
    return sorted((Run(p) for p in root.iterdir() if (p / "config.yaml").is_file()), key=lambda r: r.dir.name)


def write_manifest(
    run: Run, seed: int, data_files: dict[str, str], model_dir: str | None, extra: dict[str, Any] | None = None
) -> None:
    """manifest.json: versions, seed, hardware, data and base-model hashes, and `extra` (e.g. the reward)."""
    manifest = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seed": seed,
        "packages": {name: _version(name) for name in PACKAGES},
        "python": platform.python_version(),
        "git_sha": _git_sha(),
        "hardware": _hardware(),
        "data": data_files,
        "base_model": {"path": model_dir, "sha256": dir_sha256(model_dir) if model_dir else None},
        **(extra or {}),
    }
    write_json(run.dir / "manifest.json", manifest)


@contextmanager
def atomic_writer(path: Path) -> Iterator[TextIO]:
    """A text file written in full or not at all: streamed to a temp file beside it, then renamed,
    so readers see the old or the new file, never half of one. The file gets the usual permissions
    (mkstemp's are owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path) as fh:
        fh.write(text)


def write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    """One JSON object a line, written atomically."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=_jsonable) + "\n" for r in records))


def peak_rss_mb() -> float:
    """The peak resident memory of this process so far, in MB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def memory_now() -> dict[str, float]:
    """This process's resident memory now and its peak so far, in MB (what metrics.jsonl records at
    each logged step and evaluation: where the peak rose between two records, that phase raised it)."""
    import psutil

    now = psutil.Process().memory_info().rss / 2**20
    # The kernel's high-water mark (ru_maxrss) is updated lazily and can lag the resident size.
    return {"rss_mb": round(now, 1), "peak_rss_mb": round(max(now, peak_rss_mb()), 1)}


def config_hash(config: dict[str, Any], ignore: Iterable[str] = ("output",)) -> str:
    """Hash of the resolved config, leaving out sections that do not change the result."""
    kept = {k: v for k, v in config.items() if k not in set(ignore)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dir_sha256(path: str | Path) -> str | None:
    """Hash of a model directory's weight and config files, or of a model file (GGUF); None for a hub id."""
    root = Path(path)
    if root.is_file():
        return file_sha256(root)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(root.rglob("*")):
        if file.is_file() and file.suffix in (".safetensors", ".bin", ".json", ".txt", ".model", ".gguf"):
            digest.update(str(file.relative_to(root)).encode())
            digest.update(file_sha256(file).encode())
    return digest.hexdigest()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _hardware() -> dict[str, Any]:
    import psutil
    import torch

    info: dict[str, Any] = {
        "machine": platform.machine(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")
