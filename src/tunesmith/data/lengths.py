"""Token lengths of rows, and (sft) what the loss mask leaves trained once `max_length` applies.

With the model's tokenizer a length is what training sees: special tokens included, sft rows
rendered and encoded by templates.py (`encode_examples`). Without a tokenizer it is the number of
whitespace-separated words, and what only encoding can tell (truncation, EOS) is not checked.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

from tunesmith.data.sft import SftExample
from tunesmith.data.templates import Encoded, encode_example, encode_examples, resolve_template
from tunesmith.errors import DataError

__all__ = ["SftMeasure", "classification_lengths", "sft_measures"]

_UNLIMITED = 2**31 - 1
_ALL_WEIGHT_ZERO = "no token is trained: every assistant message has weight 0"


@dataclass(frozen=True)
class SftMeasure:
    """One sft row, encoded.

    Attributes:
        length: tokens (or words, without a tokenizer) before `max_length` applies.
        untrainable: why no token would be trained ("" when some is).
        missing_eos: the row is trained but its last trained EOS is cut off by `max_length`, or
            the tokenizer has no EOS.
        error: the row cannot be rendered (e.g. a chat template error); "" when it can.
    """

    length: int
    untrainable: str = ""
    missing_eos: bool = False
    error: str = ""


def classification_lengths(texts: Sequence[str], pairs: Sequence[str | None], tokenizer: Any | None) -> list[int]:
    """Tokens of each text (with its pair and the special tokens), or words without a tokenizer."""
    if tokenizer is None or not texts:
        return [len(text.split()) + len((pair or "").split()) for text, pair in zip(texts, pairs, strict=True)]
    if any(pair is not None for pair in pairs):
        encoded = tokenizer(list(texts), [pair or "" for pair in pairs], add_special_tokens=True)
    else:
        encoded = tokenizer(list(texts), add_special_tokens=True)
    return [len(ids) for ids in encoded["input_ids"]]


def sft_measures(
    examples: Sequence[SftExample],
    tokenizer: Any | None,
    template: Literal["auto", "chat", "plain"],
    train_on_prompt: bool,
    max_length: int,
    overlong: Literal["truncate", "drop", "error"],
) -> list[SftMeasure]:
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
) -> SftMeasure:
    # The template choice of encode_examples: under "auto" chat rows always use a chat template.
    resolved = "chat" if template == "auto" and example.kind == "chat" else resolve_template(tokenizer, template)
    try:
        row = encode_example(example, tokenizer, resolved, train_on_prompt)
    except DataError as e:
        return SftMeasure(0, error=str(e).removeprefix(f"{example.where}: "))
    except ValueError as e:  # transformers' own refusals, e.g. a conversation opening with the assistant
        return SftMeasure(0, error=f"the chat template fails on this conversation ({e}); fix the conversation")
    return _measure(row, tokenizer.eos_token_id, max_length, overlong)


def _measure(row: Encoded, eos_id: int | None, max_length: int, overlong: str) -> SftMeasure:
    length = len(row.input_ids)
    if not any(row.targets):
        return SftMeasure(length, untrainable=_ALL_WEIGHT_ZERO if row.input_ids else "the row renders to no token")
    if length <= max_length:
        return SftMeasure(length, missing_eos=eos_id is None)  # encoding always trains an EOS
    if overlong != "truncate":
        return SftMeasure(length)
    if not any(row.targets[:max_length]):
        return SftMeasure(
            length, untrainable=f"data.max_length ({max_length}) cuts the row before its first trained token"
        )
    return SftMeasure(length, missing_eos=eos_id is None or not 0 <= _last_trained(row, eos_id) < max_length)


def _last_trained(row: Encoded, token: int) -> int:
    """The position of the last trained occurrence of `token` (-1 if none)."""
    for position in range(len(row.input_ids) - 1, -1, -1):
        if row.targets[position] and row.input_ids[position] == token:
            return position
    return -1


def _measure_words(example: SftExample) -> SftMeasure:
    """Without a tokenizer: length in words; untrainable only when every assistant turn has weight 0."""
    if example.kind == "text":
        return SftMeasure(len((example.text or "").split()))
    length = sum(len(m.content.split()) for m in example.messages)
    trained = any(m.role == "assistant" and m.weight == 1 for m in example.messages)
    return SftMeasure(length, untrainable="" if trained else _ALL_WEIGHT_ZERO)
