"""Preference records: a prompt and two responses, one preferred (reward models, DPO).

Formats, every bad row reported at once:
- `{prompt, chosen, rejected}`: the prompt a string or a conversation (`[{role, content}, ...]`),
  each response a string or a one-message assistant conversation (as TRL writes them);
- OpenAI's DPO rows: `{input: {messages}, preferred_output: [{role: assistant, content}],
  non_preferred_output: [...]}`.

`as_sft` turns one side of a pair into an instruction example, so both responses are rendered,
masked and tokenised exactly as instruction tuning does it (data/templates.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.data.readers import Row
from tunesmith.data.records import short_repr, summarize_problems
from tunesmith.data.sft import Message, SftExample, _message, _RowError
from tunesmith.data.templates import Encoded
from tunesmith.errors import DataError

__all__ = ["PreferenceExample", "as_sft", "encode_pairs", "to_preference_examples"]

_FORMATS = '{"prompt", "chosen", "rejected"} or {"input": {"messages"}, "preferred_output", "non_preferred_output"}'


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair.

    Attributes:
        prompt: the conversation before the responses (one user message for a plain prompt).
        chosen, rejected: the preferred and the other response.
        kind: "prompt" (a plain prompt string) or "chat" (a conversation).
        where: the row's origin (`file.jsonl:12`).
    """

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    kind: Literal["prompt", "chat"] = "prompt"
    where: str = ""

    label = None  # pairs have no label (splits and few-shot treat them as one group)

    def key(self) -> str:
        """What splits and samples hash: the prompt and both responses."""
        prompt = "".join(f"\x00{m.role}\x01{m.content}" for m in self.prompt)
        return f"{prompt}\x02{self.chosen}\x03{self.rejected}"


def to_preference_examples(rows: Sequence[Row]) -> list[PreferenceExample]:
    """Examples from rows in either format.

    Raises:
        DataError: listing every bad row: a missing or non-string field, an empty response, a
            prompt that is not a conversation ending with a user turn, or chosen equal to rejected.
    """
    examples: list[PreferenceExample] = []
    problems: list[str] = []
    for row in rows:
        try:
            examples.append(_example(row))
        except _RowError as exc:
            problems.append(f"{row.where}: {exc}")
    if problems:
        raise DataError(summarize_problems(problems, "problem(s) in the preference data; fix them all, then run again"))
    return examples


def as_sft(example: PreferenceExample, side: Literal["chosen", "rejected"]) -> SftExample:
    """The prompt and one response as an instruction example (the response is what is scored)."""
    response = example.chosen if side == "chosen" else example.rejected
    return SftExample((*example.prompt, Message("assistant", response)), kind=example.kind, where=example.where)


def _example(row: Row) -> PreferenceExample:
    data = row.data
    if "input" in data or "preferred_output" in data:
        raw = data.get("input")
        if not isinstance(raw, dict) or "messages" not in raw:
            raise _RowError(f"'input' must be an object with 'messages', got {short_repr(raw)}")
        prompt, kind = _conversation(raw["messages"], "input.messages"), "chat"
        chosen = _response(data, "preferred_output")
        rejected = _response(data, "non_preferred_output")
    elif "chosen" in data or "rejected" in data or "prompt" in data:
        prompt_value = data.get("prompt")
        if isinstance(prompt_value, str) and prompt_value.strip():
            prompt, kind = (Message("user", prompt_value),), "prompt"
        elif isinstance(prompt_value, list):
            prompt, kind = _conversation(prompt_value, "prompt"), "chat"
        else:
            raise _RowError(f"'prompt' must be a non-empty string or a conversation, got {short_repr(prompt_value)}")
        chosen, rejected = _response(data, "chosen"), _response(data, "rejected")
    else:
        raise _RowError(
            f"no preference format matches this row (fields present: {', '.join(data) or 'none'}); use {_FORMATS}"
        )
    if chosen.strip() == rejected.strip():
        raise _RowError("chosen and rejected are the same response; a pair needs two different ones")
    return PreferenceExample(prompt, chosen, rejected, kind, row.where)  # type: ignore[arg-type]


def _conversation(raw: Any, field: str) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw or not all(isinstance(m, dict) for m in raw):
        raise _RowError(f"{field!r} must be a non-empty list of {{role, content}} objects, got {short_repr(raw)}")
    messages = tuple(_message(m, index) for index, m in enumerate(raw))
    if messages[-1].role != "user":
        raise _RowError(f"{field!r} must end with a user message (the responses answer it), not {messages[-1].role}")
    return messages


def _response(data: dict[str, Any], field: str) -> str:
    if field not in data:
        raise _RowError(f"missing field {field!r} (fields present: {', '.join(data)}); formats: {_FORMATS}")
    value = data[field]
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = _message(value[0], 0)
        if message.role != "assistant":
            raise _RowError(f"{field!r} must be the assistant's message, not {message.role}'s")
        value = message.content
    if not isinstance(value, str):
        raise _RowError(f"{field!r} must be a string or one assistant message, got {short_repr(value)}")
    if not value.strip():
        raise _RowError(f"empty {field!r}; a pair needs two responses")
    return value


def encode_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer: Any,
    template: Literal["auto", "chat", "plain"],
    max_length: int,
    overlong: Literal["truncate", "drop", "error"],
) -> tuple[list[tuple[Encoded, Encoded]], dict[str, int]]:
    """Both sides of each pair as token ids with their response tokens marked (as instruction tuning
    renders them, EOS included). A pair is kept or dropped whole, so the sides stay aligned.

    Returns:
        The encoded (chosen, rejected) pairs, and counts: "rows", "truncated", "dropped_overlong",
        "no_trainable_token" (a side truncated before its response) and "kept".

    Raises:
        DataError: under `overlong: error`, listing every pair with a side over `max_length`.
    """
    from tunesmith.data.templates import encode_example, resolve_template

    resolved = resolve_template(tokenizer, template)
    counts = {"rows": len(examples), "truncated": 0, "dropped_overlong": 0, "no_trainable_token": 0}
    pairs: list[tuple[Encoded, Encoded]] = []
    too_long: list[str] = []
    for example in examples:
        render = "chat" if template == "auto" and example.kind == "chat" else resolved
        sides = [encode_example(as_sft(example, side), tokenizer, render) for side in ("chosen", "rejected")]
        longest = max(len(s.input_ids) for s in sides)
        if longest > max_length:
            if overlong == "error":
                too_long.append(f"{example.where}: {longest} tokens")
                continue
            if overlong == "drop":
                counts["dropped_overlong"] += 1
                continue
            counts["truncated"] += 1
            sides = [Encoded(s.input_ids[:max_length], s.targets[:max_length], s.where) for s in sides]
        if not all(any(s.targets) for s in sides):
            counts["no_trainable_token"] += 1
            continue
        pairs.append((sides[0], sides[1]))
    if too_long:
        raise DataError(
            summarize_problems(
                too_long,
                f"pair(s) longer than data.max_length={max_length}; raise it or set data.overlong: truncate or drop",
            )
        )
    counts["kept"] = len(pairs)
    return pairs, counts
