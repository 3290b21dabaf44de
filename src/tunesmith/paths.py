"""Where tunesmith keeps what it computes once per machine: converted models, measured kernel choices."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """`$TUNESMITH_CACHE`, `$XDG_CACHE_HOME/tunesmith` or `~/.cache/tunesmith`, the first that is set."""
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tunesmith"
    return Path.home() / ".cache" / "tunesmith"
