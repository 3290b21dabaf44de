"""Use a `.gguf` file as a base model: de-quantize it once into a plain fp32 Hugging Face directory.

Loading with `from_pretrained(..., gguf_file=...)` gives a model flagged as quantized that cannot
train or save (DESIGN §12), so the weights are moved into a model rebuilt from its config and saved.

The converted directory is cached under `cache_root()/models/<stem>-<sha256[:16]>/` (see
`tunesmith.models.convert_cache`: built in a temporary directory, trusted once its `.complete`
marker exists); the file's sha256 is remembered by (path, size, mtime_ns) in
`cache_root()/gguf-sha256.json`, so finding a cached conversion does not re-read the file.
"""

from __future__ import annotations

import copy
import struct
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.models.convert_cache import COMPLETE_MARKER, build_once, cache_root, file_sha256

__all__ = ["COMPLETE_MARKER", "cache_root", "convert_gguf"]

_GGUF_MAGIC = b"GGUF"
_HASH_SIDECAR = "gguf-sha256.json"


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
    return build_once(
        target,
        {"source": str(path), "sha256": sha256},
        lambda out: _write_plain_model(path, out),  # looked up at call time: tests replace it
        f"converting {path.name} to fp32 once; cached in {target}",
    )


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
    """sha256 of `path`, remembered in root's GGUF sidecar so a cache hit does not re-read the file."""
    return file_sha256(path, root / _HASH_SIDECAR)


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
