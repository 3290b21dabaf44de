"""What the quality checks need to know about one row: is it readable as the task's record, is it
empty, its text (for duplicates and leakage), its label, and (chat) whether its roles are in order.

Validation reuses the readers of training (records.py, sft.py), so a row the check passes is a row
training can read, and its problem is reported in the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.config import DataConfig
from tunesmith.data.readers import Row
from tunesmith.data.records import to_examples
from tunesmith.data.sft import Message, SftExample, to_sft_examples
from tunesmith.errors import DataError

__all__ = ["RowFacts", "Task", "compare_text", "inspect_row", "normalize", "role_problem"]

Task = Literal["classification", "sft"]


@dataclass(frozen=True)
class RowFacts:
    """One row, as the quality checks see it.

    Attributes:
        status: "ok", "schema_error" (not readable as the task's record) or "empty".
        problem: for a schema error or an empty row, what is wrong and the fix.
        text: classification: the text; sft: every turn with its role (`compare_text`).
        label: the classification label (after `label_map`).
        pair: the classification text pair, if the task has one.
        example: the sft example.
    """

    status: Literal["ok", "schema_error", "empty"]
    problem: str = ""
    text: str = ""
    label: str | None = None
    pair: str | None = None
    example: SftExample | None = None

    @property
    def compared(self) -> str:
        """The text compared for duplicates and leakage: the text and its pair, if any."""
        return self.text if self.pair is None else f"{self.text}\n\x00\n{self.pair}"


def inspect_row(row: Row, cfg: DataConfig, task: Task) -> RowFacts:
    """Check one row as training would read it: classification records or sft examples."""
    empty = _empty_field(row.data, cfg, task)
    if empty:
        return RowFacts("empty", problem=empty)
    try:
        if task == "sft":
            (example,) = to_sft_examples([row])
            return RowFacts("ok", text=compare_text(example), example=example)
        (ex,) = to_examples([row], cfg.text_field, cfg.label_field, cfg.text_pair_field, cfg.label_map)
    except DataError as e:
        return RowFacts("schema_error", problem=_row_problem(str(e), row.where))
    return RowFacts("ok", text=ex.text, label=ex.label, pair=ex.text_pair)


def normalize(text: str) -> str:
    """The text compared for exact duplicates: lower case, runs of whitespace as one space."""
    return " ".join(text.lower().split())


def compare_text(example: SftExample) -> str:
    """An sft example as one text: every turn with its role (plain-text rows as they are)."""
    if example.kind == "text":
        return example.text or ""
    return "\n".join(f"{m.role}: {m.content}" for m in example.messages)


def role_problem(messages: tuple[Message, ...]) -> str:
    """What is out of order in a conversation, or "" when nothing is.

    Problems: a system message after the first turn, two turns in a row by the same role, an
    assistant turn before any user turn, and a conversation that does not end with the assistant.
    """
    roles = [m.role for m in messages]
    late_system = [i for i, role in enumerate(roles) if role == "system" and i > 0]
    if late_system:
        return f"messages[{late_system[0]}] is a system message after the first turn; put it first"
    repeated = [i for i in range(1, len(roles)) if roles[i] == roles[i - 1]]
    if repeated:
        i = repeated[0]
        return f"messages[{i - 1}] and messages[{i}] are both {roles[i]!r}; merge them or let the turns alternate"
    turns = [role for role in roles if role != "system"]
    if turns and turns[0] == "assistant":
        return "the assistant speaks before any user message; start with the user's turn"
    if roles and roles[-1] != "assistant":
        return f"the conversation ends with a {roles[-1]!r} message; end it with the assistant's reply"
    return ""


def _empty_field(data: dict[str, Any], cfg: DataConfig, task: Task) -> str:
    """The empty (or whitespace-only) field that makes this row empty, described; "" if none."""
    if task == "classification":
        fields = [cfg.text_field] + ([cfg.text_pair_field] if cfg.text_pair_field else [])
    elif "messages" in data:
        return _empty_message(data["messages"])
    elif "prompt" in data or "completion" in data:
        fields = ["prompt", "completion"]
    elif "instruction" in data or "output" in data:
        fields = ["instruction", "output"]
    else:
        fields = ["text"]
    for field in fields:
        value = data.get(field)
        if isinstance(value, str) and not value.strip():
            return f"empty {field!r}" + (" (whitespace only)" if value else "") + "; write it or remove the row"
    return ""


def _empty_message(messages: Any) -> str:
    if not isinstance(messages, list):
        return ""
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            continue
        content = message.get("content")
        if isinstance(content, str) and not content.strip():
            return f"messages[{index}] ({message['role']}) is empty; write it or remove the row"
    return ""


def _row_problem(message: str, where: str) -> str:
    """The problems of one row from a validation error about that row alone, without its origin."""
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    problems = [line.removeprefix(f"{where}: ") for line in lines]
    return "; ".join(problems) or message
