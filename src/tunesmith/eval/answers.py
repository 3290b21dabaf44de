"""Greedy answers of an instruction-tuned model, scored by exact match against the references.

Exact match compares normalised strings (lower case, punctuation and surrounding or repeated
whitespace removed, as SQuAD's evaluation does), so "Positive." matches "positive".
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from typing import Any

from tunesmith.data.sft import Message, SftExample
from tunesmith.data.templates import encode_prompt
from tunesmith.eval.evaluate import eval_batches
from tunesmith.models.generate import Sampling, generate_ids

__all__ = ["answer_prompts", "eos_ids", "exact_match", "normalize_answer", "split_prompt"]

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def split_prompt(example: SftExample) -> tuple[tuple[Message, ...], str | None]:
    """The conversation before the last assistant turn, and that turn's text (the reference)."""
    messages = example.messages
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=None)
    if last is None:
        return messages, None
    return messages[:last], messages[last].content


def answer_prompts(
    model: Any,
    tokenizer: Any,
    template: str,
    prompts: Sequence[str | Sequence[Message]],
    sampling: Sampling,
    batch_size: int,
    autocast: Callable[[], Any],
    on_token: Callable[[int, int], None] | None = None,
) -> list[str]:
    """Generated text for each prompt (rendered as training rendered it), in input order.
    `on_token(row, id)` sees each token as it is chosen (rows index `prompts`)."""
    ids = [encode_prompt(p, tokenizer, template) for p in prompts]  # type: ignore[arg-type]
    eos = eos_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[str] = [""] * len(ids)
    for batch in eval_batches([len(x) for x in ids], batch_size):
        stream = None if on_token is None else (lambda row, token, b=batch: on_token(b[row], token))
        with autocast():
            new = generate_ids(model, [ids[i] for i in batch], eos, sampling, pad, stream)
        for i, tokens in zip(batch, new, strict=True):
            out[i] = tokenizer.decode(tokens, skip_special_tokens=True)
    return out


def exact_match(
    model: Any,
    tokenizer: Any,
    template: str,
    examples: Sequence[SftExample],
    max_new_tokens: int,
    batch_size: int,
    autocast: Callable[[], Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """({exact_match, answered}, one {prompt, reference, output, match} record per example)."""
    pairs = [split_prompt(e) for e in examples if e.text is None]
    pairs = [(p, r) for p, r in pairs if r is not None and p]
    if not pairs:
        return {}, []
    outputs = answer_prompts(
        model, tokenizer, template, [p for p, _ in pairs], Sampling(max_new_tokens), batch_size, autocast
    )
    records = []
    for (prompt, reference), output in zip(pairs, outputs, strict=True):
        match = normalize_answer(output) == normalize_answer(reference or "")
        records.append({"prompt": prompt[-1].content, "reference": reference, "output": output, "match": match})
    score = sum(bool(r["match"]) for r in records) / len(records)
    return {"exact_match": score, "answered": len(records)}, records


def eos_ids(tokenizer: Any, model: Any) -> list[int]:
    """The tokenizer's EOS and any the model's generation config adds (e.g. an end-of-turn token)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    return sorted(ids | set(getattr(model, "eos_ids", ())))
