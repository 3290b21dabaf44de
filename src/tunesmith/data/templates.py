"""Rendering instruction-tuning examples to token ids with a loss mask (what is trained).

Chat is rendered with the tokenizer's own chat template, one segment per turn, so the ids trained on
before each assistant turn are exactly the ids inference feeds (`encode_prompt`). Only
completion/assistant tokens are targets (unless `train_on_prompt`), and EOS is always trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from tunesmith.data.records import summarize_problems
from tunesmith.data.sft import Message, SftExample
from tunesmith.errors import ConfigError, DataError

__all__ = [
    "FALLBACK_CHAT_TEMPLATE",
    "Encoded",
    "encode_example",
    "encode_examples",
    "encode_prompt",
    "resolve_template",
]

_OVERLONG = ("truncate", "drop", "error")

# ChatML, as used by SmolLM2 and Qwen; only used for a tokenizer that has no chat template of its own.
FALLBACK_CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Encoded:
    """An example as token ids.

    Attributes:
        input_ids: the token ids.
        targets: 1 where the token is a training target (the model learns to predict it), else 0.
        where: the row's origin.
    """

    input_ids: list[int]
    targets: list[int]
    where: str = ""


@dataclass(frozen=True)
class _Segment:
    """A piece of rendered text, tokenized on its own.

    `part` says what it is: "prompt" (trained only with train_on_prompt), "completion" (an
    assistant turn, trained when `weight` is 1) or "text" (always trained). `special` tokenizes
    with the tokenizer's special tokens (a BOS where it adds one), for the start of plain rows.
    """

    text: str
    part: Literal["prompt", "completion", "text"]
    weight: int = 1
    special: bool = False


def resolve_template(tokenizer: Any, template: Literal["auto", "chat", "plain"]) -> Literal["chat", "plain"]:
    """The template to render prompt rows with: "auto" is "chat" when the tokenizer has a chat template.

    Raises:
        ConfigError: `template` is not "auto", "chat" or "plain".
    """
    if template == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "plain"
    if template not in ("chat", "plain"):
        raise ConfigError(f"data.template: unknown value {template!r}; use auto, chat or plain")
    return template


def encode_example(
    example: SftExample, tokenizer: Any, template: Literal["chat", "plain"], train_on_prompt: bool = False
) -> Encoded:
    """Token ids and targets of one example (see `encode_examples`).

    Raises:
        DataError: a chat row under the plain template, or a chat template that rewrites earlier turns.
    """
    segments = _segments(example, tokenizer, template)
    ids = _tokenize(segments, tokenizer)
    return _assemble(segments, ids, tokenizer.eos_token_id, train_on_prompt, example.where)


def encode_prompt(prompt: str | Sequence[Message], tokenizer: Any, template: Literal["chat", "plain"]) -> list[int]:
    """The ids inference feeds to generate a reply: exactly what training saw before that reply.

    Args:
        prompt: a user message, or a conversation (under "plain", one user message).
        tokenizer: the model's tokenizer (a Hugging Face tokenizer).
        template: "chat" renders the conversation with the generation prompt (the tokenizer's chat
            template, or `FALLBACK_CHAT_TEMPLATE`); "plain" tokenizes the text as it is.

    Raises:
        DataError: a conversation under "plain", or a chat template that rewrites earlier turns.
    """
    messages = (Message("user", prompt),) if isinstance(prompt, str) else tuple(prompt)
    if template == "plain":
        if len(messages) != 1 or messages[0].role != "user":
            raise DataError("a conversation needs a chat template to become a prompt; set data.template: chat")
        return list(tokenizer(messages[0].content)["input_ids"])
    segments = _chat_segments(messages, tokenizer, "the prompt", add_generation_prompt=True)
    return [token for ids in _tokenize(segments, tokenizer) for token in ids]


def encode_examples(
    examples: Sequence[SftExample],
    tokenizer: Any,
    template: Literal["auto", "chat", "plain"],
    train_on_prompt: bool,
    max_length: int,
    overlong: Literal["truncate", "drop", "error"],
) -> tuple[list[Encoded], dict[str, int]]:
    """Render and tokenize examples, then apply the length limit.

    Targets are the assistant/completion tokens (with the template's end-of-turn marker), except
    weight-0 assistant messages; with `train_on_prompt` every other token too. The first token is
    never a target. When the last trained completion does not contain the tokenizer's EOS (plain
    rows, text rows, templates that end turns otherwise), an EOS is inserted after it and trained.
    Under "auto" prompt rows use the tokenizer's chat template if it has one, else plain text, and
    chat rows use its chat template or `FALLBACK_CHAT_TEMPLATE`. Text rows are tokenized as they are.

    Args:
        max_length: the most tokens of a row, the appended EOS included.
        overlong: for longer rows: "truncate" keeps the first `max_length` tokens, "drop" removes
            the row, "error" raises.

    Returns:
        The encoded rows that have a target, and counts: "rows", "truncated", "dropped_overlong",
        "no_trainable_token" (rows left with no target: all weight 0, or truncated before the
        completion; removed) and "kept".

    Raises:
        DataError: rows over `max_length` when `overlong` is "error" (all listed), a chat row
            under the plain template, or a chat template that rewrites earlier turns.
        ConfigError: a bad `template`, `max_length` or `overlong`.
    """
    if max_length < 1:
        raise ConfigError(f"data.max_length must be a positive number of tokens, got {max_length!r}")
    if overlong not in _OVERLONG:
        raise ConfigError(f"data.overlong: unknown value {overlong!r}; use {', '.join(_OVERLONG)}")
    resolved = resolve_template(tokenizer, template)
    # Under "auto" chat rows always use a chat template (the fallback when the tokenizer has none).
    plans = [
        _segments(ex, tokenizer, "chat" if template == "auto" and ex.kind == "chat" else resolved) for ex in examples
    ]
    ids = iter(_tokenize([segment for plan in plans for segment in plan], tokenizer))
    encoded = [
        _assemble(plan, [next(ids) for _ in plan], tokenizer.eos_token_id, train_on_prompt, ex.where)
        for plan, ex in zip(plans, examples, strict=True)
    ]
    counts = {"rows": len(encoded), "truncated": 0, "dropped_overlong": 0, "no_trainable_token": 0}
    encoded = _limit(encoded, max_length, overlong, counts)
    trainable = [row for row in encoded if any(row.targets)]
    counts["no_trainable_token"] = len(encoded) - len(trainable)
    counts["kept"] = len(trainable)
    return trainable, counts


def _limit(encoded: list[Encoded], max_length: int, overlong: str, counts: dict[str, int]) -> list[Encoded]:
    """Apply `max_length` to every row, counting what was truncated or dropped."""
    over = [row for row in encoded if len(row.input_ids) > max_length]
    if over and overlong == "error":
        raise DataError(
            summarize_problems(
                [f"{row.where}: {len(row.input_ids)} tokens" for row in over],
                f"row(s) longer than data.max_length ({max_length} tokens); raise data.max_length, "
                "or set data.overlong: truncate (keep the first tokens) or drop (skip those rows)",
            )
        )
    if overlong == "drop":
        counts["dropped_overlong"] = len(over)
        return [row for row in encoded if len(row.input_ids) <= max_length]
    counts["truncated"] = len(over)
    return [Encoded(row.input_ids[:max_length], row.targets[:max_length], row.where) for row in encoded]


def _segments(example: SftExample, tokenizer: Any, template: Literal["chat", "plain"]) -> list[_Segment]:
    """The example's text split into prompt, completion and text segments."""
    if example.kind == "text":
        return [_Segment(example.text or "", "text", special=True)]
    if template == "chat":
        return _chat_segments(example.messages, tokenizer, example.where, add_generation_prompt=False)
    if example.kind == "chat":
        raise DataError(
            f"{example.where}: a chat ('messages') row cannot be rendered as plain text; chat rows need "
            "a chat template: set data.template: chat (a tokenizer without one uses ChatML)"
        )
    prompt, *completion = example.messages
    return [
        _Segment(prompt.content, "prompt", special=True),
        *(_Segment(m.content, "completion", m.weight) for m in completion),
    ]


def _chat_segments(
    messages: Sequence[Message], tokenizer: Any, where: str, add_generation_prompt: bool
) -> list[_Segment]:
    """Render a conversation turn by turn: the prompt before each assistant turn, then that turn.

    The prompt before assistant turn i is what `render(messages[:i], add_generation_prompt=True)`
    adds to the text so far, and the turn is what `render(messages[:i + 1])` adds to that: its
    content and the template's end-of-turn marker. Inference renders the same prefix.
    """
    segments: list[_Segment] = []
    done = ""
    for index, message in enumerate(messages):
        if message.role != "assistant":
            continue
        prefix = _render(messages[:index], tokenizer, where, add_generation_prompt=True)
        full = _render(messages[: index + 1], tokenizer, where, add_generation_prompt=False)
        _check_prefix(done, prefix, where)
        _check_prefix(prefix, full, where)
        segments.append(_Segment(prefix[len(done) :], "prompt"))
        segments.append(_Segment(full[len(prefix) :], "completion", message.weight))
        done = full
    end = _render(messages, tokenizer, where, add_generation_prompt)
    _check_prefix(done, end, where)
    segments.append(_Segment(end[len(done) :], "prompt"))
    return [segment for segment in segments if segment.text]


def _render(messages: Sequence[Message], tokenizer: Any, where: str, add_generation_prompt: bool) -> str:
    from jinja2 import TemplateError  # lazily, like transformers itself

    # Passing the fallback per call leaves the caller's tokenizer unchanged.
    template = None if getattr(tokenizer, "chat_template", None) else FALLBACK_CHAT_TEMPLATE
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    if not conversation:
        raise DataError(f"{where}: the conversation starts with an assistant turn; add the user turn it answers")
    try:
        text = tokenizer.apply_chat_template(
            conversation, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except (TemplateError, ValueError) as e:
        raise DataError(
            f"{where}: the chat template cannot render this conversation ({e}); fix the conversation "
            "(many templates need turns that alternate user/assistant) or set data.template: plain"
        ) from e
    assert isinstance(text, str), "apply_chat_template(tokenize=False) returns text"
    return text


def _check_prefix(prefix: str, text: str, where: str) -> None:
    if not text.startswith(prefix):
        raise DataError(
            f"{where}: the chat template renders earlier turns differently once a later turn is added, "
            "so what training sees would not be what inference sees; set data.template: plain "
            "(prompt/completion rows) or use a model whose chat template keeps earlier turns unchanged"
        )


def _tokenize(segments: Sequence[_Segment], tokenizer: Any) -> list[list[int]]:
    """The ids of every segment, tokenized in (at most) two batches."""
    ids: list[list[int]] = [[] for _ in segments]
    for special in (True, False):
        indices = [i for i, segment in enumerate(segments) if segment.special == special]
        if indices:
            batch = tokenizer([segments[i].text for i in indices], add_special_tokens=special)["input_ids"]
            for i, row in zip(indices, batch, strict=True):
                ids[i] = list(row)
    return ids


def _assemble(
    segments: Sequence[_Segment], ids: Sequence[list[int]], eos_id: int | None, train_on_prompt: bool, where: str
) -> Encoded:
    """Concatenate segment ids with their targets, adding EOS after the last trained completion."""
    trained = [train_on_prompt if s.part == "prompt" else s.weight == 1 for s in segments]
    completions = [i for i, s in enumerate(segments) if s.part != "prompt" and s.weight == 1]
    last = completions[-1] if completions else None
    input_ids: list[int] = []
    targets: list[int] = []
    for index, segment_ids in enumerate(ids):
        input_ids += segment_ids
        targets += [int(trained[index])] * len(segment_ids)
        if index == last and eos_id is not None and eos_id not in segment_ids:
            input_ids.append(eos_id)
            targets.append(1)
    if targets:
        targets[0] = 0  # nothing comes before the first token, so it cannot be predicted
    return Encoded(input_ids, targets, where)
