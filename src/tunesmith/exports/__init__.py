"""Export a trained run to where it runs (DESIGN §10), each export proven to match the trained model.

`export_run(run, fmt, out)` loads the run, takes its probe (tunesmith.exports.parity), hands both to
the format's module, which writes the artifact into a scratch directory beside `out`, loads it back
with the format's own library (transformers, peft, onnxruntime, gguf) and measures parity. Only when
parity holds is the model card written and the scratch directory renamed to `out`: a failed check
leaves nothing behind and says by how much it failed.

Formats (one module each): `hf` (a directory plain transformers loads), `peft` (an adapter directory
plain peft loads onto the base), `onnx` (onnxruntime; `--quantize int8`), `gguf` (llama.cpp and
Ollama; `--quantize q8_0|q4_0`). A format that does not fit a run's task or method refuses in one line.
"""

from __future__ import annotations

import importlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.exports.parity import Parity, Probe, make_probe
from tunesmith.inference import Trained, load_trained

__all__ = ["FORMATS", "Exported", "export_run", "format_module"]

# format -> (module, quantizations it offers)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hf": ("tunesmith.exports.hf", ()),
    "peft": ("tunesmith.exports.peft", ()),
    "onnx": ("tunesmith.exports.onnx", ("int8",)),
    "gguf": ("tunesmith.exports.gguf", ("f16", "q8_0", "q4_0")),
}


@dataclass
class Exported:
    """What an export wrote and how it measured against the trained model."""

    format: str
    path: Path
    parity: Parity
    load_seconds: float  # loading the artifact with its own library
    latency_ms: float  # per probe row, through the artifact (median of repeats)
    load_hint: str  # the Python (or shell) lines that load it in its own ecosystem
    quantize: str | None = None
    details: dict[str, Any] = field(default_factory=dict)  # what the format adds (quantization effects)
    size_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "quantize": self.quantize,
            "path": str(self.path),
            "size_bytes": self.size_bytes,
            "load_seconds": round(self.load_seconds, 3),
            "latency_ms_per_row": round(self.latency_ms, 3),
            "parity": self.parity.to_dict(),
            **self.details,
        }


# A format module's entry point: (trained run, its probe, scratch directory, quantization) -> Exported.
Exporter = Callable[[Trained, Probe, Path, "str | None"], Exported]


def format_module(fmt: str) -> Any:
    """The module that writes `fmt`.

    Raises:
        ConfigError: an unknown format.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: use one of {', '.join(FORMATS)}")
    return importlib.import_module(FORMATS[fmt][0])


def export_run(
    run_dir: str | Path,
    fmt: str,
    out: str | Path,
    quantize: str | None = None,
    data: str | Path | None = None,
    rows: int = 8,
) -> Exported:
    """Export the trained run `run_dir` as `fmt` into the new directory `out`, parity checked.

    Args:
        quantize: a quantization the format offers (onnx: int8; gguf: f16, q8_0, q4_0).
        data: the rows to probe parity with (default: the run's test split, else its validation split).
        rows: how many probe rows.

    Raises:
        ConfigError: an unknown format or quantization, a format that does not fit the run, or an `out`
            that already holds files.
        ParityError: the artifact does not match the trained model (nothing is written).
    """
    module = format_module(fmt)
    offered = FORMATS[fmt][1]
    if quantize is not None and quantize not in offered:
        choices = f"one of {', '.join(offered)}" if offered else "no --quantize"
        raise ConfigError(f"--quantize {quantize!r}: --format {fmt} takes {choices}")
    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ConfigError(f"-o {target}: already exists and is not empty; give a new directory")
    trained = load_trained(run_dir)
    module.check(trained, quantize)  # refuses in one line before any work
    probe = make_probe(trained, data, rows)
    scratch = target.with_name(f".{target.name}.partial-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        started = time.perf_counter()
        exported: Exported = module.export(trained, probe, scratch, quantize)
        exported.parity.require(f"the {fmt} export of {trained.where}")
        exported.details.setdefault("export_seconds", round(time.perf_counter() - started, 1))
        from tunesmith.exports.card import write_card

        exported.size_bytes = _size(scratch)
        exported.load_hint = exported.load_hint.replace(scratch.name, target.name)
        exported.path = target
        write_card(scratch, trained, exported, probe)
        if target.exists():
            target.rmdir()
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return exported


def _size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
