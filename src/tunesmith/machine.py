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
    try:
        known = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    entry = known.get(key)
    if isinstance(entry, dict):
        return {**entry, "cached": True}
    entry = measure()
    try:  # re-read: another command may have added its own entries meanwhile
        current = json.loads(path.read_text(encoding="utf-8"))
        known = current if isinstance(current, dict) else known
    except (OSError, ValueError):
        pass
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_name(f".{path.name}.{os.getpid()}")
        scratch.write_text(json.dumps(known | {key: entry}, indent=2) + "\n", encoding="utf-8")
        os.replace(scratch, path)
    except OSError:
        pass
    return {**entry, "cached": False}
