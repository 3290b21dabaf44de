"""Name -> plug-in tables for tasks and methods, filled by decorators in each plug-in's own module.

The core finds a plug-in by name here and never imports one: the built-in plug-ins are imported on
the first lookup, by module name, from the lists below (as a plug-in system loads what it is
configured with). Adding a task is its own module (or small package) with `@register_task(name)`,
plus one line in BUILTIN_TASKS; a method likewise, with `@register_method(name)` and BUILTIN_METHODS.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from tunesmith.errors import ConfigError

__all__ = [
    "BUILTIN_METHODS",
    "BUILTIN_TASKS",
    "method_class",
    "methods",
    "register_method",
    "register_task",
    "task_class",
    "tasks",
    "unregister_task",
]

T = TypeVar("T")

# In the order `tunesmith methods`, the config reference and error messages list them.
BUILTIN_METHODS = (
    "tunesmith.methods.full",
    "tunesmith.methods.freeze",
    "tunesmith.methods.lora",
    "tunesmith.methods.adapter",
    "tunesmith.methods.prompt",
    "tunesmith.methods.ia3",
)
BUILTIN_TASKS = (
    "tunesmith.tasks.classification",
    "tunesmith.tasks.image_classification",
    "tunesmith.tasks.sft",
    "tunesmith.tasks.reward",
    "tunesmith.tasks.dpo",
    "tunesmith.tasks.rl",
    "tunesmith.tasks.audio_classification",
    "tunesmith.tasks.transcription",
)

# name -> the plug-in's class: a method class takes its config section (`cls.config`), a task class
# takes the whole run config; both are described by the protocols in tunesmith.plugins.
_METHODS: dict[str, Any] = {}
_TASKS: dict[str, Any] = {}
_loaded = False


def register_method(name: str) -> Callable[[T], T]:
    """Register a method class under `name` (its `name` attribute must agree)."""
    return _register(_METHODS, "method", name)


def register_task(name: str) -> Callable[[T], T]:
    """Register a task class under `name` (its `name` attribute must agree)."""
    return _register(_TASKS, "task", name)


def methods() -> dict[str, Any]:
    """Every registered method class by name, built-ins first (in BUILTIN_METHODS order)."""
    _load_builtins()
    return _ordered(_METHODS, BUILTIN_METHODS)


def tasks() -> dict[str, Any]:
    """Every registered task class by name, built-ins first (in BUILTIN_TASKS order)."""
    _load_builtins()
    return _ordered(_TASKS, BUILTIN_TASKS)


def method_class(name: str) -> Any:
    """The method class registered as `name`.

    Raises:
        ConfigError: no such method, with the closest name.
    """
    return _lookup(methods(), "method.name", name)


def task_class(name: str) -> Any:
    """The task class registered as `name`.

    Raises:
        ConfigError: no such task, with the closest name.
    """
    return _lookup(tasks(), "task", name)


def unregister_task(name: str) -> None:
    """Remove a task (for tests that register a task of their own)."""
    _TASKS.pop(name, None)


def _register(table: dict[str, Any], kind: str, name: str) -> Callable[[T], T]:
    def decorate(cls: T) -> T:
        if name in table:
            raise RuntimeError(f"{kind} {name!r} registered twice")
        if getattr(cls, "name", name) != name:
            raise RuntimeError(f"{kind} registered as {name!r} calls itself {getattr(cls, 'name', None)!r}")
        table[name] = cls
        return cls

    return decorate


def _lookup(table: dict[str, Any], key: str, name: str) -> Any:
    if name not in table:
        hint = difflib.get_close_matches(name, list(table), n=1)
        suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ConfigError(f"{key}={name}: unknown{suggestion} (choose from {', '.join(table)})")
    return table[name]


def _ordered(table: dict[str, Any], builtins: tuple[str, ...]) -> dict[str, Any]:
    """The table in a fixed order whatever was imported first: built-ins as listed, then the rest."""

    def rank(name: str) -> int:
        module = table[name].__module__
        return next((i for i, b in enumerate(builtins) if module == b or module.startswith(b + ".")), len(builtins))

    return {name: table[name] for name in sorted(table, key=lambda n: (rank(n), list(table).index(n)))}


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True  # first, so a plug-in that looks a table up while it loads does not load again
    try:
        for module in (*BUILTIN_METHODS, *BUILTIN_TASKS):
            importlib.import_module(module)
    except BaseException:
        _loaded = False
        raise
