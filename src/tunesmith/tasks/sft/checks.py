"""The streamed data gate's view of instruction rows: which rows are empty or malformed, whether a
conversation's roles are in order, how long a row is once rendered, and what its loss mask leaves
trained once `max_length` applies.

With the model's tokenizer a length is what training sees: special tokens included, rows rendered
and encoded by data/templates.py (`encode_examples`). Without a tokenizer it is the number of
whitespace-separated words, and what only encoding can tell (truncation, EOS) is not checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

from tunesmith.config import DataConfig
from tunesmith.data.quality import Finding, Measure, RowFacts, Scan, row_problem
from tunesmith.data.quality import findings as checks
from tunesmith.data.readers import Row
from tunesmith.data.sft import Message, SftExample, to_sft_examples
from tunesmith.data.templates import Encoded, encode_example, encode_examples, resolve_template
from tunesmith.errors import DataError

__all__ = ["SftRows", "compare_text", "role_problem", "sft_measures"]

_UNLIMITED = 2**31 - 1
_ALL_WEIGHT_ZERO = "no token is trained: every assistant message has weight 0"


class SftRows:
    """Instruction rows for the streamed gate (prompt/completion, Alpaca, chat, or plain text)."""

    task = "sft"
    labelled = False
    tallies: tuple[str, ...] = ("role_order",)

    def __init__(self, data: DataConfig) -> None:
        self.data = data

    def inspect(self, row: Row) -> RowFacts:
        empty = _empty_field(row.data)
        if empty:
            return RowFacts("empty", problem=empty)
        try:
            (example,) = to_sft_examples([row])
        except DataError as e:
            return RowFacts("schema_error", problem=row_problem(str(e), row.where))
        problem = role_problem(example.messages) if example.kind == "chat" else ""
        notes = (("role_order", problem),) if problem else ()
        return RowFacts("ok", text=compare_text(example), example=example, notes=notes)

    def measure(self, facts: Sequence[RowFacts], tokenizer: Any | None) -> list[Measure]:
        d = self.data
        examples = [f.example for f in facts]
        return sft_measures(examples, tokenizer, d.template, d.train_on_prompt, d.max_length, d.overlong)

    def findings(self, scan: Scan) -> tuple[Finding, ...]:
        fix = "fix the order of those conversations"
        role_order = checks.limited_tally(scan, "role_order", scan.cfg.thresholds.max_role_order, "count", fix)
        return (
            checks.leakage(scan),
            checks.overlong(scan),
            checks.untrainable(scan),
            checks.missing_eos(scan),
            role_order,
        )


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


def _empty_field(data: dict[str, Any]) -> str:
    """The empty (or whitespace-only) field that makes this row empty, described; "" if none."""
    if "messages" in data:
        return _empty_message(data["messages"])
    if "prompt" in data or "completion" in data:
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


def sft_measures(
    examples: Sequence[SftExample],
    tokenizer: Any | None,
    template: Literal["auto", "chat", "plain"],
    train_on_prompt: bool,
    max_length: int,
    overlong: Literal["truncate", "drop", "error"],
) -> list[Measure]:
    """Measure sft rows as `encode_examples` would encode them, before and after `max_length`.

    Rows longer than `max_length` are only measured further under `overlong: truncate` (otherwise
    training leaves them out or stops).
    """
    if tokenizer is None or not examples:
        return [_measure_words(example) for example in examples]
    # encode_examples drops rows with no target; tagging each row with its position finds them.
    tagged = [replace(example, where=str(i)) for i, example in enumerate(examples)]
    try:
        encoded, _ = encode_examples(tagged, tokenizer, template, train_on_prompt, _UNLIMITED, "truncate")
    except (DataError, ValueError):  # a row cannot be rendered: encode one by one to tell which
        return [
            _measure_alone(example, tokenizer, template, train_on_prompt, max_length, overlong) for example in examples
        ]
    by_position = {int(row.where): row for row in encoded}
    return [
        _measure(by_position[i], tokenizer.eos_token_id, max_length, overlong)
        if i in by_position
        else _measure_alone(example, tokenizer, template, train_on_prompt, max_length, overlong)
        for i, example in enumerate(examples)
    ]


def _measure_alone(
    example: SftExample,
    tokenizer: Any,
    template: Literal["auto", "chat", "plain"],
    train_on_prompt: bool,
    max_length: int,
    overlong: str,
) -> Measure:
    # The template choice of encode_examples: under "auto" chat rows always use a chat template.
    resolved = "chat" if template == "auto" and example.kind == "chat" else resolve_template(tokenizer, template)
    try:
        row = encode_example(example, tokenizer, resolved, train_on_prompt)
    except DataError as e:
        return Measure(0, error=str(e).removeprefix(f"{example.where}: "))
    except ValueError as e:  # transformers' own refusals, e.g. a conversation opening with the assistant
        return Measure(0, error=f"the chat template fails on this conversation ({e}); fix the conversation")
    return _measure(row, tokenizer.eos_token_id, max_length, overlong)


def _measure(row: Encoded, eos_id: int | None, max_length: int, overlong: str) -> Measure:
    length = len(row.input_ids)
    if not any(row.targets):
        return Measure(length, untrainable=_ALL_WEIGHT_ZERO if row.input_ids else "the row renders to no token")
    if length <= max_length:
        return Measure(length, missing_eos=eos_id is None)  # encoding always trains an EOS
    if overlong != "truncate":
        return Measure(length)
    if not any(row.targets[:max_length]):
        return Measure(
            length, untrainable=f"data.max_length ({max_length}) cuts the row before its first trained token"
        )
    return Measure(length, missing_eos=eos_id is None or not 0 <= _last_trained(row, eos_id) < max_length)


def _last_trained(row: Encoded, token: int) -> int:
    """The position of the last trained occurrence of `token` (-1 if none)."""
    for position in range(len(row.input_ids) - 1, -1, -1):
        if row.targets[position] and row.input_ids[position] == token:
            return position
    return -1


def _measure_words(example: SftExample) -> Measure:
    """Without a tokenizer: length in words; untrainable only when every assistant turn has weight 0."""
    if example.kind == "text":
        return Measure(len((example.text or "").split()))
    length = sum(len(m.content.split()) for m in example.messages)
    trained = any(m.role == "assistant" and m.weight == 1 for m in example.messages)
    return Measure(length, untrainable="" if trained else _ALL_WEIGHT_ZERO)
