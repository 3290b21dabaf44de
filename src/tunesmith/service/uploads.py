"""Uploaded training files, checked as the records a job will read: JSON Lines, one object a line, every
row of one kind. The file object's `status` and `status_details` carry the verdict, with the line
number of the first problem, so a user fixes the file before a job ever starts.

Kinds (OpenAI's formats first, tunesmith's own after):
- `chat`: `{"messages": [{"role", "content"}, ...]}` (supervised; reinforcement when it ends on a user turn)
- `prompt_completion`: `{"prompt", "completion"}`
- `preference`: `{"input": {"messages"}, "preferred_output": [...], "non_preferred_output": [...]}` or
  `{"prompt", "chosen", "rejected"}` (dpo)
- `records`: any other object (a tunesmith task's records, e.g. `{"text", "label"}`; needs a
  `tunesmith` section in the job that names the task)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.service.openai_schema import OPENAI_METHODS

__all__ = ["FileVerdict", "check_upload", "fits_method"]

ROLES = ("system", "user", "assistant")  # what tunesmith's chat reader takes
MAX_ERRORS_SHOWN = 1


@dataclass(frozen=True)
class FileVerdict:
    kind: str | None
    rows: int
    error: str | None  # "line 3: ..." when the file cannot be used


def check_upload(path: Path) -> FileVerdict:
    """The kind and row count of a JSONL file, or the first line that is wrong and why."""
    kind: str | None = None
    rows = 0
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                return FileVerdict(
                    None, rows, f"line {number}: not valid JSON ({exc}); each line must be one JSON object"
                )
            if not isinstance(row, dict):
                return FileVerdict(None, rows, f"line {number}: a JSON {type(row).__name__}, not an object")
            row_kind, problem = _row_kind(row)
            if problem:
                return FileVerdict(None, rows, f"line {number}: {problem}")
            if kind is not None and row_kind != kind:
                return FileVerdict(None, rows, f"line {number}: a {row_kind} row in a file of {kind} rows")
            kind = row_kind
            rows += 1
    if rows == 0:
        return FileVerdict(None, 0, "the file has no rows; give one JSON object per line")
    return FileVerdict(kind, rows, None)


def fits_method(kind: str | None, method: str) -> str | None:
    """Why a file of `kind` cannot train `method` (None when it can)."""
    wanted = OPENAI_METHODS[method].reads
    if kind in wanted:
        return None
    return f"a {method} job reads {' or '.join(wanted)} rows; this file has {kind} rows"


def _row_kind(row: dict[str, Any]) -> tuple[str, str | None]:
    if "messages" in row:
        return "chat", _messages_problem(row["messages"], "messages")
    if "preferred_output" in row or "non_preferred_output" in row:
        return "preference", _preference_problem(row)
    if {"prompt", "chosen", "rejected"} <= row.keys():
        bad = [k for k in ("prompt", "chosen", "rejected") if not isinstance(row[k], str)]
        return "preference", f"{bad[0]}: must be a string" if bad else None
    if "prompt" in row and "completion" in row:
        bad = [k for k in ("prompt", "completion") if not isinstance(row[k], str)]
        return "prompt_completion", f"{bad[0]}: must be a string" if bad else None
    return "records", None


def _messages_problem(messages: Any, where: str) -> str | None:
    if not isinstance(messages, list) or not messages:
        return f"{where}: must be a non-empty list of {{role, content}} objects"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"{where}[{i}].role: must be one of {', '.join(ROLES)}"
        content = message.get("content")
        if not isinstance(content, str):
            return f"{where}[{i}].content: must be a string (content parts and tool calls are not read)"
    return None


def _preference_problem(row: dict[str, Any]) -> str | None:
    source = row.get("input")
    if not isinstance(source, dict):
        return "input: must be an object with messages"
    problem = _messages_problem(source.get("messages"), "input.messages")
    if problem:
        return problem
    for key in ("preferred_output", "non_preferred_output"):
        problem = _messages_problem(row.get(key), key)
        if problem:
            return problem
    return None
