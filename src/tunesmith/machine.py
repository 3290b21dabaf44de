"""What tunesmith knows of the machine it runs on: the CPU's name, and where it keeps what it computes
once per machine (converted models, measured kernel choices)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cache_root", "cpu_name"]


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
