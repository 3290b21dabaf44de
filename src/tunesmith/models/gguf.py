"""Use a `.gguf` file as a base model: de-quantize it once into a plain fp32 Hugging Face directory.

Loading with `from_pretrained(..., gguf_file=...)` gives a model flagged as quantized that cannot
train or save (DESIGN §12), so the weights are moved into a model rebuilt from its config and saved.

The converted directory is cached under `cache_root()/models/<stem>-<sha256[:16]>/`, where
`cache_root()` is `$TUNESMITH_CACHE` if set, else `$XDG_CACHE_HOME/tunesmith`, else
`~/.cache/tunesmith`. A directory is trusted only once its `.complete` marker exists; it is built
in a temporary directory beside it and renamed into place, so an interrupted conversion leaves
nothing a later run trusts. The file's sha256 is remembered by (path, size, mtime_ns) in
`cache_root()/gguf-sha256.json`, so finding a cached conversion does not re-read the file.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import struct
import sys
import tempfile
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.runs import atomic_write_text

__all__ = ["COMPLETE_MARKER", "cache_root", "convert_gguf"]

COMPLETE_MARKER = ".complete"
_GGUF_MAGIC = b"GGUF"
_HASH_SIDECAR = "gguf-sha256.json"


def cache_root() -> Path:
    """Where tunesmith caches converted models: `$TUNESMITH_CACHE`, `$XDG_CACHE_HOME/tunesmith` or
    `~/.cache/tunesmith`, the first that is set."""
    if os.environ.get("TUNESMITH_CACHE"):
        return Path(os.environ["TUNESMITH_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "tunesmith"
    return Path.home() / ".cache" / "tunesmith"


def convert_gguf(gguf_path: str | Path, root: Path | None = None) -> Path:
    """The plain fp32 Hugging Face directory for `gguf_path`, converting it on first use.

    Args:
        gguf_path: a GGUF model file of an architecture transformers can load.
        root: the cache root (default `cache_root()`).

    Returns:
        `root/models/<file stem>-<first 16 hex of its sha256>/` with config.json (no
        quantization_config, dtype float32), model.safetensors, generation_config.json when the
        model has one, and the tokenizer with its chat template.

    Raises:
        ConfigError: the file is missing, is not GGUF, or transformers cannot load it.
    """
    path = _check_gguf_file(Path(gguf_path).expanduser())
    root = cache_root() if root is None else root
    sha256 = _file_sha256(path, root)
    target = root / "models" / f"{path.stem}-{sha256[:16]}"
    if (target / COMPLETE_MARKER).is_file():
        return target
    print(f"converting {path.name} to fp32 once; cached in {target}", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        _write_plain_model(path, building)
        marker = {"source": str(path), "sha256": sha256}
        (building / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        _move_into_place(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)  # only left when another process won, or on error
    return target


def _check_gguf_file(path: Path) -> Path:
    """`path`, resolved, if it is an existing file that starts with the GGUF magic bytes."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such GGUF file; give the path of an existing .gguf model file")
    with path.open("rb") as fh:
        magic = fh.read(len(_GGUF_MAGIC))
    if magic != _GGUF_MAGIC:
        raise ConfigError(
            f"{path}: not a GGUF file (it does not start with the bytes 'GGUF'); give a .gguf model file, "
            "or a Hugging Face model directory"
        )
    return path.absolute()


def _file_sha256(path: Path, root: Path) -> str:
    """sha256 of `path`, remembered in root's sidecar by (path, size, mtime_ns) so it is read once."""
    stat = path.stat()
    key = str(path)
    sidecar = root / _HASH_SIDECAR
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


def _write_plain_model(path: Path, out: Path) -> None:
    """De-quantize `path` and save a plain fp32 model, its generation config and tokenizer in `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # what a truncated, corrupt or unsupported file raises (struct.error: the header ends early)
    except (ImportError, OSError, ValueError, KeyError, NotImplementedError, struct.error) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{path}: transformers cannot load this GGUF model ({reason})") from None
    model = _plain_copy(loaded)
    if model.can_generate() and loaded.generation_config is not None:
        model.generation_config = loaded.generation_config
    del loaded
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _plain_copy(loaded: Any) -> Any:
    """A model rebuilt from `loaded`'s config without its quantization flag, holding its weights."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every weight must arrive; tied weights (lm_head = embed_tokens) stay tied.
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.eval()
    return model


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
