"""Errors a user can act on: each names what was wrong, where it came from, and the fix."""

from __future__ import annotations

__all__ = ["ConfigError", "DataError", "TunesmithError"]


class TunesmithError(Exception):
    """Base class: the CLI prints these without a traceback and exits non-zero."""


class ConfigError(TunesmithError):
    """A configuration value is missing, unknown or invalid (the message names its path)."""


class DataError(TunesmithError):
    """A data file or row cannot be used (the message names the file and line)."""
