"""The data quality checks of preference pairs (data/preferences.py), for the tasks that learn from them.

Every row has already been read as a pair (a bad row stops the run with its file and line, a pair
whose responses are equal included). Checked here: exact duplicate pairs, contradicting pairs (the
same prompt and responses, preferred the other way round), validation/test pairs that also occur
in training (leakage, either way round), and a response side longer than `data.max_length` in
words (the tokens are counted when the pairs are encoded, and reported in plan.json).
"""

from __future__ import annotations

from collections.abc import Sequence

from tunesmith.config import DataConfig
from tunesmith.data.load import read_preference_examples
from tunesmith.data.preferences import PreferenceExample
from tunesmith.data.quality.report import QualityReport, limited

__all__ = ["check_pair_file", "check_preferences"]

_KEEP_FIRST = "remove the extra copies (the first is kept)"
_HELD_OUT_FIX = "remove these from validation/test (or from training)"


def check_pair_file(source: str, references: Sequence[str], data: DataConfig, task: str) -> QualityReport:
    """`check_preferences` of the pairs in `source`, against the pairs of `references` for leakage."""
    held = [e for r in references for e in read_preference_examples(r, data)]
    return check_preferences(read_preference_examples(source, data), held, data, task, source)


def check_preferences(
    train: Sequence[PreferenceExample],
    held_out: Sequence[PreferenceExample],
    cfg: DataConfig,
    task: str,
    source: str,
) -> QualityReport:
    """The report on training pairs; held-out pairs are compared with them for leakage."""
    t = cfg.thresholds
    seen: dict[tuple[str, str, str], str] = {}
    duplicates: list[str] = []
    contradicting: list[str] = []
    for ex in train:
        key = _key(ex)
        if key in seen:
            duplicates.append(f"{ex.where} (as {seen[key]})")
            continue
        flipped = (key[0], key[2], key[1])
        if flipped in seen:
            contradicting.append(f"{ex.where} reverses {seen[flipped]}")
        seen[key] = ex.where
    leaked = [ex.where for ex in held_out if _key(ex) in seen or (_key(ex)[0], _key(ex)[2], _key(ex)[1]) in seen]
    longest = [max(len(ex.chosen.split()), len(ex.rejected.split())) for ex in train]
    over = [ex.where for ex, n in zip(train, longest, strict=True) if n > cfg.max_length]
    held_note = "held-out pairs also in training" if held_out else "no validation/test file given"
    findings = (
        limited("duplicates", duplicates, len(train), t, _KEEP_FIRST, "the same prompt, chosen and rejected response"),
        limited(
            "conflicting", contradicting, len(train), t, "keep one direction of each pair", "a pair and its reverse"
        ),
        limited("leakage", leaked, len(held_out), t, _HELD_OUT_FIX, held_note, checked=bool(held_out)),
        limited(
            "overlong",
            over,
            len(train),
            t,
            f"raise data.max_length or shorten the responses (data.overlong: {cfg.overlong})",
            "responses counted in whitespace words",
        ),
    )
    return QualityReport(source, task, len(train) + len(held_out), findings, "words")


def _key(ex: PreferenceExample) -> tuple[str, str, str]:
    prompt = "\x00".join(f"{m.role}\x01{m.content}" for m in ex.prompt)
    return prompt, ex.chosen.strip(), ex.rejected.strip()
