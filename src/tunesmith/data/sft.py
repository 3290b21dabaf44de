"""Instruction-tuning (SFT) records: rows in the OpenAI chat (`messages`), prompt/completion,
Alpaca and plain-text formats become `SftExample`s, every bad row reported at once.
Rendering them to token ids with a loss mask is data/templates.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.data.readers import Row
from tunesmith.data.records import short_repr, summarize_problems
from tunesmith.errors import DataError

__all__ = ["Message", "Role", "SftExample", "to_sft_examples"]

Role = Literal["system", "user", "assistant"]
_ROLES = ("system", "user", "assistant")

_FORMATS = (
    '{"messages": [{"role", "content"}, ...]}, {"prompt", "completion"}, '
    '{"instruction", "input" (optional), "output"} or {"text"}'
)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation.

    Attributes:
        role: who speaks: "system", "user" or "assistant".
        content: the text, exactly as in the file.
        weight: OpenAI's per-message weight; 0 means this assistant message is not trained
            (it only has an effect on assistant messages).
    """

    role: Role
    content: str
    weight: int = 1


@dataclass(frozen=True)
class SftExample:
    """One SFT example.

    Attributes:
        messages: the conversation; () for plain-text rows.
        text: the text of a plain-text row (continued pre-training: every token is trained).
        kind: "chat" (from `messages`), "prompt" (prompt/completion or Alpaca) or "text".
        where: the row's origin (`file.jsonl:12`).
    """

    messages: tuple[Message, ...]
    text: str | None = None
    kind: Literal["chat", "prompt", "text"] = "chat"
    where: str = ""

    label = None  # instruction rows have no label (splits and few-shot treat them as one group)

    def key(self) -> str:
        """What splits and samples hash: the text and every turn, so exact copies share a side."""
        return (self.text or "") + "".join(f"\x00{m.role}\x01{m.content}" for m in self.messages)


class _RowError(Exception):
    """A problem with one row (collected, then reported together)."""


# ----------------------------------------------------------------------------- rows -> examples


def to_sft_examples(rows: Sequence[Row], require_completion: bool = True) -> list[SftExample]:
    """Build SFT examples from rows, detecting each row's format by its fields.

    Formats: `{messages: [{role, content, weight?}, ...]}` (OpenAI chat), `{prompt, completion}`,
    Alpaca `{instruction, input?, output}` (the user turn is the instruction, then a blank line and
    the input when there is one) and `{text}`. Texts are kept exactly as in the file.

    Args:
        rows: the rows, after `column_map` renaming.
        require_completion: False for generation inputs: a prompt row may lack its completion and a
            conversation may have no assistant turn.

    Raises:
        DataError: listing every bad row (the first 20 of them) with the fix.
    """
    examples: list[SftExample] = []
    problems: list[str] = []
    for row in rows:
        try:
            examples.append(_example(row, require_completion))
        except _RowError as e:
            problems.append(f"{row.where}: {e}")
    if problems:
        raise DataError(summarize_problems(problems, "problem(s) in the SFT data; fix them all, then run again"))
    return examples


def _example(row: Row, require_completion: bool) -> SftExample:
    data = row.data
    if "messages" in data:
        return _chat_example(row, require_completion)
    if "prompt" in data or "completion" in data:
        prompt = _string(row, "prompt")
        return _prompt_example(prompt, _completion(row, "completion", require_completion), row.where)
    if "instruction" in data or "output" in data:
        return _alpaca_example(row, require_completion)
    if "text" in data:
        text = _string(row, "text")
        if not text.strip():
            raise _RowError("empty 'text'; remove the row or give it a text")
        return SftExample((), text=text, kind="text", where=row.where)
    raise _RowError(
        f"no SFT format matches this row (fields present: {', '.join(data) or 'none'}); "
        f"use one of {_FORMATS}, or rename fields with data.column_map"
    )


def _chat_example(row: Row, require_completion: bool) -> SftExample:
    raw = row.data["messages"]
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise _RowError(
            f"'messages' must be a non-empty list of objects like "
            f'{{"role": "user", "content": "..."}}, got {short_repr(raw)}; fix the row'
        )
    messages = tuple(_message(m, index) for index, m in enumerate(raw))
    if require_completion and not any(m.role == "assistant" for m in messages):
        raise _RowError(
            "the conversation has no assistant message, so there is nothing to train on; "
            "add the assistant's reply or remove the row"
        )
    return SftExample(messages, kind="chat", where=row.where)


def _message(raw: dict[str, Any], index: int) -> Message:
    at = f"messages[{index}]"
    role = raw.get("role")
    if role not in _ROLES:
        found = "has no 'role'" if role is None else f"has role {short_repr(role)}"
        tools = " (tool and function messages are not supported)" if role in ("tool", "function") else ""
        raise _RowError(
            f"{at} {found}; only 'system', 'user' and 'assistant' are supported{tools}; rewrite or remove that message"
        )
    if raw.get("tool_calls") or raw.get("function_call"):
        raise _RowError(f"{at} holds tool/function calls, which are not supported; remove them from the data")
    content = raw.get("content")
    if not isinstance(content, str):
        found = "has no 'content'" if content is None else f"has content {short_repr(content)}"
        raise _RowError(f"{at} ({role}) {found}; 'content' must be a string (lists of parts are not supported)")
    if role == "assistant" and not content.strip():
        raise _RowError(f"{at} is an empty assistant message; write the reply or remove the message")
    return Message(role, content, _weight(raw.get("weight"), at))


def _weight(value: Any, at: str) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in (0, 1):
        raise _RowError(f"{at} has weight {short_repr(value)}; a weight must be 0 (not trained) or 1 (trained)")
    return int(value)


def _alpaca_example(row: Row, require_completion: bool) -> SftExample:
    instruction = _string(row, "instruction")
    extra = row.data.get("input")
    if _is_missing(extra):
        extra = ""
    if not isinstance(extra, str):
        raise _RowError(f"field 'input' must be a string, got {type(extra).__name__} ({short_repr(extra)}); quote it")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _prompt_example(prompt, _completion(row, "output", require_completion), row.where)


def _prompt_example(prompt: str, completion: str | None, where: str) -> SftExample:
    user = Message("user", prompt)
    messages = (user,) if completion is None else (user, Message("assistant", completion))
    return SftExample(messages, kind="prompt", where=where)


def _string(row: Row, field: str) -> str:
    if field not in row.data:
        raise _RowError(
            f"missing field {field!r} (fields present: {', '.join(row.data)}); "
            f"add it or rename a field with data.column_map (formats: {_FORMATS})"
        )
    value = row.data[field]
    if not isinstance(value, str):
        raise _RowError(f"field {field!r} must be a string, got {type(value).__name__} ({short_repr(value)}); fix it")
    return value


def _completion(row: Row, field: str, required: bool) -> str | None:
    value = row.data.get(field)
    if not required and (_is_missing(value) or (isinstance(value, str) and not value.strip())):
        return None
    value = _string(row, field)
    if not value.strip():
        raise _RowError(f"empty {field!r}, so there is nothing to train on; write it or remove the row")
    return value


def _is_missing(value: Any) -> bool:
    """Null, or NaN (a missing value in pandas-written files)."""
    return value is None or (isinstance(value, float) and math.isnan(value))
