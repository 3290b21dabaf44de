"""tunesmith: fine-tune pre-trained models with every strategy through one training loop."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "RunConfig",
    "TunesmithError",
    "check_data",
    "clean_data",
    "compare",
    "evaluate",
    "export",
    "generate",
    "load_config",
    "plan",
    "predict",
    "score",
    "train",
    "transcribe",
]

if TYPE_CHECKING:
    from tunesmith.api import (
        check_data,
        clean_data,
        compare,
        evaluate,
        export,
        generate,
        load_config,
        plan,
        predict,
        score,
        train,
        transcribe,
    )
    from tunesmith.config import RunConfig
    from tunesmith.errors import ConfigError, DataError, TunesmithError

# Heavy modules (torch, transformers) load on first use, so `import tunesmith` stays cheap.
_LAZY = {
    "train": "tunesmith.api",
    "evaluate": "tunesmith.api",
    "export": "tunesmith.api",
    "check_data": "tunesmith.api",
    "clean_data": "tunesmith.api",
    "compare": "tunesmith.api",
    "generate": "tunesmith.api",
    "plan": "tunesmith.api",
    "predict": "tunesmith.api",
    "score": "tunesmith.api",
    "transcribe": "tunesmith.api",
    "load_config": "tunesmith.api",
    "RunConfig": "tunesmith.config",
    "ConfigError": "tunesmith.errors",
    "DataError": "tunesmith.errors",
    "TunesmithError": "tunesmith.errors",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tunesmith' has no attribute {name!r}")
