"""Name -> implementation tables, filled by decorators in each plug-in's own module."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["METHODS", "register_method"]

T = TypeVar("T")

# method name -> factory taking the method's config section and returning a `Method`
METHODS: dict[str, Callable[[Any], Any]] = {}


def register_method(name: str) -> Callable[[T], T]:
    def decorate(factory: T) -> T:
        if name in METHODS:
            raise RuntimeError(f"method {name!r} registered twice")
        METHODS[name] = factory  # type: ignore[assignment]
        return factory

    return decorate
