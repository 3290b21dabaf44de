"""The README's config reference, generated from the schema (a test keeps the README in step).

Regenerate with `python -m tunesmith.docs` and paste between the README's reference markers.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from tunesmith import config as c
from tunesmith import registry

__all__ = ["config_reference", "sections"]

CORE: list[tuple[str, type[BaseModel]]] = [
    ("model", c.ModelConfig),
    ("data", c.DataConfig),
    ("data.thresholds", c.QualityThresholds),
    ("data.replay", c.ReplayConfig),
    ("data.augment", c.AugmentConfig),
    ("train", c.TrainConfig),
    ("train.early_stopping", c.EarlyStoppingConfig),
    ("train.distributed", c.DistributedConfig),
    ("train.tensorboard", c.TensorBoardConfig),
    ("train.mlflow", c.MlflowConfig),
    ("eval", c.EvalConfig),
    ("eval.retention", c.RetentionConfig),
    ("output", c.OutputConfig),
]


def sections() -> list[tuple[str, type[BaseModel]]]:
    """Every config section: the core ones, each task's own section, each method's options."""
    tasks = [(name, cls.section) for name, cls in registry.tasks().items() if cls.section]
    methods = [(f"method (name: {name})", cls.config) for name, cls in registry.methods().items()]
    return [*CORE, *tasks, *methods]


def config_reference() -> str:
    """Markdown: one table per config section, with each key's type, default and meaning."""
    parts = []
    for title, model in sections():
        rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            if name == "name" and title.startswith("method"):
                continue
            rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(field)} | {field.description or ''} |")
        if len(rows) > 2:
            parts.append(f"**`{title}`**\n\n" + "\n".join(rows))
        else:
            parts.append(f"**`{title}`**: no options.")
    return "\n\n".join(parts) + "\n"


def _type(annotation: Any) -> str:
    return _plain(annotation).replace("|", "\\|")


def _plain(annotation: Any) -> str:
    """`float | 'auto' | None`: a union that holds a Literal is spelled out choice by choice (its own
    repr would be `Union[float, Literal['auto'], NoneType]`)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if typing.get_origin(annotation) is typing.Annotated:  # a constrained type, e.g. an int >= 0: its base
        return _plain(args[0])
    if typing.get_origin(annotation) is list and typing.get_origin(args[0]) is typing.Literal:
        return f"list[{_plain(args[0])}]"  # a list of choices: list['a' | 'b']
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and any(
        typing.get_origin(a) is typing.Literal for a in args
    ):
        return " | ".join("None" if a is type(None) else _plain(a) for a in args)
    text = str(annotation).replace("typing.", "").replace("tunesmith.config.", "")
    return text.replace("<class '", "").replace("'>", "")


def _default(field: Any) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(its section's defaults)"
    return f"`{value!r}`"


if __name__ == "__main__":
    print(config_reference())
