"""The checks of speech data (audio-classification and transcription): every clip is decoded once
before training.

- unreadable: files that are missing, truncated, not audio, or empty, named by path or row;
- silent: clips whose peak is below -60 dBFS (a broken recording, or a file of zeros);
- overlong: clips longer than `data.max_seconds` (they are cut to it);
- sample_rates: how many clips have each native rate, and how many are below the model's (upsampled:
  the missing bandwidth is not recovered); reported, no limit;
- duplicates: the same sound under any name or format (decoded samples at the model's rate, rounded
  to 16 bits, hashed): a lossy re-encoding of a clip is not caught;
- conflicting: the same clip under two labels (audio-classification);
- leakage: validation/test clips equal to a training clip;
- label_balance (audio-classification), or for transcription empty transcripts and transcripts
  longer than `data.max_length` tokens.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.audio import AudioExample, decode_native
from tunesmith.data.quality.report import Finding, QualityReport, limited
from tunesmith.errors import DataError

__all__ = ["ClipFacts", "check_audio", "clip_facts"]

SILENCE_PEAK = 1e-3  # -60 dBFS
_SHOWN = 5


@dataclass(frozen=True)
class ClipFacts:
    """What the gate learns of one clip by decoding it."""

    key: str  # hash of the sound (see the module docstring)
    seconds: float
    rate: int  # its native rate
    peak: float


def clip_facts(example: AudioExample, rate: int) -> ClipFacts:
    """Decode a clip once and measure it.

    Raises:
        DataError: the clip cannot be read (naming it).
    """
    import soxr

    samples, native = decode_native(example.audio, example.where)
    resampled = samples if native == rate else soxr.resample(samples, native, rate)
    quantized = np.clip(np.round(resampled * 32767), -32768, 32767).astype("<i2")
    key = hashlib.sha256(quantized.tobytes()).hexdigest()
    return ClipFacts(key, len(samples) / native, native, float(np.abs(samples).max()))


def check_audio(
    train: Sequence[AudioExample],
    held_out: Sequence[AudioExample],
    cfg: DataConfig,
    source: str,
    task: str,
    rate: int,
    max_seconds: float | None,
    token_count: Callable[[str], int] | None = None,
) -> QualityReport:
    """The report on training clips (and held-out ones, for readability and leakage).

    Args:
        task: the task's name, for the report.
        rate: the model's sampling rate.
        max_seconds: the longest clip the model takes (None: not checked).
        token_count: the transcript's length in tokens (transcription), else None.
    """
    t = cfg.thresholds
    unreadable: list[str] = []
    problems: list[str] = []
    facts = _facts(train, rate, unreadable, problems)
    held_facts = _facts(held_out, rate, unreadable, problems)
    total = len(train) + len(held_out)
    every = [(ex, f) for ex, f in zip([*train, *held_out], [*facts, *held_facts], strict=True) if f is not None]
    train_pairs = [(ex, f) for ex, f in zip(train, facts, strict=True) if f is not None]
    silent = [f"{ex.where}: peak {_dbfs(f.peak)}" for ex, f in every if f.peak < SILENCE_PEAK]
    long_clips = (
        [f"{ex.where}: {f.seconds:.2f} s" for ex, f in every if f.seconds > max_seconds + 1e-6]
        if max_seconds is not None
        else []
    )
    seen: set[str] = set()
    duplicates = []
    for ex, f in train_pairs:
        if f.key in seen:
            duplicates.append(ex.where)
        seen.add(f.key)
    leaked = [ex.where for ex, f in zip(held_out, held_facts, strict=True) if f is not None and f.key in seen]
    held_note = "held-out clips that sound like a training clip" if held_out else "no validation/test file given"
    findings = [
        limited(
            "unreadable",
            problems,
            total,
            t,
            "replace or remove these clips; under data.quality: warn they are skipped",
            "each clip opened and fully decoded",
        ),
        limited("silent", silent, total, t, "replace or remove these clips (no sound)", "peak below -60 dBFS"),
        limited(
            "overlong",
            long_clips,
            total,
            t,
            "raise data.max_seconds (at most 30), or trim these clips (they are cut to data.max_seconds)",
            f"longer than {max_seconds:g} s" if max_seconds is not None else "data.max_seconds is the longest clip",
            checked=max_seconds is not None,
        ),
        _sample_rates(every, rate),
        limited(
            "duplicates",
            duplicates,
            len(train),
            t,
            "remove the extra copies (the first is kept)",
            "the same samples at the model's rate, whatever the file name or lossless format",
        ),
        limited(
            "leakage",
            leaked,
            len(held_out),
            t,
            "remove these clips from validation/test (or from training)",
            held_note,
            checked=bool(held_out),
        ),
    ]
    if token_count is None:
        findings += [_conflicting(train_pairs, t), _label_balance(train, cfg)]
    else:
        findings += _transcripts([ex for ex, _ in train_pairs], cfg, token_count)
    return QualityReport(source, task, total, tuple(findings), "seconds", unreadable=tuple(unreadable))


def _facts(
    examples: Sequence[AudioExample], rate: int, unreadable: list[str], problems: list[str]
) -> list[ClipFacts | None]:
    out: list[ClipFacts | None] = []
    for ex in examples:
        try:
            out.append(clip_facts(ex, rate))
        except DataError as exc:
            unreadable.append(ex.where)
            problems.append(str(exc))
            out.append(None)
    return out


def _dbfs(peak: float) -> str:
    return "silence" if peak <= 0 else f"{20 * np.log10(peak):.0f} dBFS"


def _sample_rates(pairs: Sequence[tuple[AudioExample, ClipFacts]], rate: int) -> Finding:
    rates = Counter(f.rate for _, f in pairs)
    low = [f"{ex.where}: {f.rate} Hz" for ex, f in pairs if f.rate < rate]
    return Finding(
        "sample_rates",
        len(low),
        len(pairs),
        None,
        None,
        fix=f"record at {rate} Hz or more where you can (a low rate loses what the model hears above half of it)",
        examples=tuple(low[:_SHOWN]),
        detail=f"clips below the model's {rate} Hz; all are resampled to it",
        stats={"rates": {str(r): n for r, n in sorted(rates.items())}},
    )


def _conflicting(pairs: Sequence[tuple[AudioExample, ClipFacts]], t: object) -> Finding:
    labels_of: dict[str, set[str]] = {}
    where_of: dict[str, str] = {}
    for ex, f in pairs:
        if ex.label is not None:
            labels_of.setdefault(f.key, set()).add(ex.label)
            where_of.setdefault(f.key, ex.where)
    found = [f"{where_of[k]}: {sorted(v)}" for k, v in labels_of.items() if len(v) > 1]
    return limited("conflicting", found, len(pairs), t, "give each clip one label, or remove it")


def _label_balance(train: Sequence[AudioExample], cfg: DataConfig) -> Finding:
    counts = Counter(ex.label for ex in train if ex.label is not None)
    ordered = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    rarest = min(ordered, key=lambda label: (ordered[label], label)) if ordered else ""
    return Finding(
        "label_balance",
        ordered.get(rarest, 0),
        sum(ordered.values()),
        cfg.thresholds.min_class_share,
        "min_share",
        setting="data.thresholds.min_class_share",
        fix="add clips of the rarest label, or lower data.thresholds.min_class_share",
        examples=tuple(f"{label}: {count}" for label, count in list(ordered.items())[:_SHOWN]),
        detail=f"rarest label {rarest!r}; count and share are its clips" if ordered else "no labelled clips",
        stats={"labels": ordered, "rarest": rarest},
    )


def _transcripts(train: Sequence[AudioExample], cfg: DataConfig, token_count: Callable[[str], int]) -> list[Finding]:
    t = cfg.thresholds
    empty = [ex.where for ex in train if not (ex.text or "").strip()]
    lengths = {ex.where: token_count(ex.text) for ex in train if ex.text}
    long_text = [f"{where}: {n} tokens" for where, n in lengths.items() if n > cfg.max_length]
    return [
        Finding(
            "empty",
            len(empty),
            len(train),
            t.max_empty,
            "count",
            "data.thresholds.max_empty",
            "give every clip its transcript, or remove it",
            examples=tuple(empty[:_SHOWN]),
            detail="transcripts empty or whitespace",
        ),
        Finding(
            "overlong_transcript",
            len(long_text),
            len(train),
            t.max_overlong_share,
            "share",
            "data.thresholds.max_overlong_share",
            f"raise data.max_length (now {cfg.max_length} tokens), or shorten these transcripts (they are cut)",
            examples=tuple(long_text[:_SHOWN]),
            detail="transcript tokens, special tokens included",
            stats={"max_tokens": max(lengths.values(), default=0)},
        ),
    ]
