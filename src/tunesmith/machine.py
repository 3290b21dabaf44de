"""What tunesmith knows of the machine it runs on: the CPU's name, and where it keeps what it computes
once per machine (converted models, measured kernel choices)."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cache_root", "cpu_name", "machine_key", "remembered"]


def cache_root() -> Path:
    """`$TUNESMITH_CACHE`, `$XDG_CACHE_HOME/tunesmith` or `~/.cache/tunesmith`, the first that is set."""
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tunesmith"
    return Path.home() / ".cache" / "tunesmith"


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_key(device: str = "cpu") -> str:
    """What a measured choice depends on besides its shape: the processor (the GPU's name on a GPU),
    the torch version and, on a CPU, the thread count."""
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name()}|torch {torch.__version__}"
    return f"{cpu_name()}|torch {torch.__version__}|{torch.get_num_threads()} threads"


def remembered(key: str, measure: Callable[[], dict[str, Any]], file: str = "machine.json") -> dict[str, Any]:
    """The entry measured for `key` on this machine: read from `cache_root()/file` where an earlier
    command measured it, else measured now and kept there (written atomically; a read-only cache
    only means measuring again next time). The entry comes back with `cached` set."""
    path = cache_root() / file
    if (str(path), key) in _SEEN:  # one answer per process, whatever other processes write meanwhile
        return {**_SEEN[str(path), key], "cached": True}
    entry = _read(path).get(key)
    if isinstance(entry, dict):
        _SEEN[str(path), key] = entry
        return {**entry, "cached": True}
    entry = measure()
    known = _read(path)  # re-read: another process may have added entries (or this one) meanwhile
    if isinstance(known.get(key), dict):  # the first measurement written is the one every process uses
        _SEEN[str(path), key] = known[key]
        return {**known[key], "cached": True}
    _SEEN[str(path), key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps(known | {key: entry}, indent=2) + "\n", encoding="utf-8")
        os.replace(scratch, path)
    except OSError:
        pass
    return {**entry, "cached": False}


_SEEN: dict[tuple[str, str], dict[str, Any]] = {}


def _read(path: Path) -> dict[str, Any]:
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return known if isinstance(known, dict) else {}
