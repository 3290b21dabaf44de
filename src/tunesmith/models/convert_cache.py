"""The cache of converted models, shared by every converter (GGUF, CTranslate2 Whisper).

A converter turns a file it cannot train (a quantized GGUF, a CTranslate2 binary) into a plain
Hugging Face directory once, under `cache_root()/models/<name>/`. `cache_root()` is
`$TUNESMITH_CACHE` if set, else `$XDG_CACHE_HOME/tunesmith`, else `~/.cache/tunesmith`.
A directory is trusted only once its `.complete` marker exists; it is built in a temporary
directory beside it and renamed into place, so an interrupted conversion leaves nothing a later
run trusts. A source file's sha256 names the directory; it is remembered by (path, size, mtime_ns)
in a sidecar JSON file, so finding a cached conversion does not re-read a large file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.machine import cache_root
from tunesmith.runs import atomic_write_text

__all__ = ["COMPLETE_MARKER", "build_once", "cache_root", "file_sha256"]

COMPLETE_MARKER = ".complete"


def file_sha256(path: Path, sidecar: Path) -> str:
    """sha256 of `path`, remembered in `sidecar` by (path, size, mtime_ns) so it is read once."""
    stat = path.stat()
    key = str(path)
    known = _read_hash_sidecar(sidecar)
    entry = known.get(key)
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return str(entry["sha256"])
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    known[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    atomic_write_text(sidecar, json.dumps(known, indent=1, sort_keys=True) + "\n")
    return digest.hexdigest()


def build_once(target: Path, marker: dict[str, Any], build: Callable[[Path], None], message: str) -> Path:
    """`target`, built by `build(directory)` first if it has no complete marker yet.

    Args:
        target: the cached directory, `cache_root()/models/<name>`.
        marker: what the `.complete` marker records (the source and its sha256).
        build: writes the converted model into the (temporary) directory it is given.
        message: printed to stderr before a conversion, so a slow first use is explained.
    """
    if (target / COMPLETE_MARKER).is_file():
        return target
    print(message, file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        build(building)
        (building / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        _move_into_place(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # only left when another process won, or on error
    return target


def _read_hash_sidecar(sidecar: Path) -> dict[str, Any]:
    """The remembered hashes; an unreadable sidecar counts as empty (every hash is then recomputed)."""
    try:
        data = json.loads(sidecar.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        print(f"ignoring the unreadable hash cache {sidecar} ({exc}); hashing again", file=sys.stderr)
        return {}
    return data if isinstance(data, dict) else {}


def _move_into_place(building: Path, target: Path) -> None:
    """Rename the finished `building` to `target`; if another process finished first, keep theirs."""
    for _ in range(2):
        try:
            os.rename(building, target)
            return
        except OSError:
            if (target / COMPLETE_MARKER).is_file():
                return  # another process converted the same file first; ours is discarded
            # an incomplete leftover (not made by this code, which only renames finished builds)
            shutil.rmtree(target, ignore_errors=True)
    raise ConfigError(f"{target}: could not move the converted model into place; remove it and run again")
