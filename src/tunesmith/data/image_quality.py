"""The data quality gate for images: every image opened and decoded once before training.

Checks: images that cannot be read (named with their path or row, skipped under `data.quality:
warn`), exact duplicates by content (the pixels or the file's bytes, whatever the file name),
the same image under different labels, validation/test images that also occur in training
(leakage), and label balance. Near-duplicate images (resized or re-encoded copies) are not
detected: that needs a perceptual hash, and is left for later.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from tunesmith.config import DataConfig
from tunesmith.data.images import ImageExample, content_key, open_image
from tunesmith.data.quality_report import Finding, QualityReport, limited
from tunesmith.errors import DataError

__all__ = ["check_images"]

_SHOWN = 5


def check_images(
    train: Sequence[ImageExample], held_out: Sequence[ImageExample], cfg: DataConfig, source: str | None = None
) -> QualityReport:
    """The report on training images (and held-out ones, for readability and leakage).

    Its `unreadable` lists the origin of every image that failed to open, train and held-out alike.
    """
    t = cfg.thresholds
    unreadable: list[str] = []
    problems: list[str] = []
    train_keys = _keys(train, unreadable, problems)
    held_keys = _keys(held_out, unreadable, problems)
    copies = Counter(k for k in train_keys if k is not None)
    duplicates = [ex.where for ex, k in _firsts_skipped(train, train_keys)]
    labels_of: dict[str, set[str]] = {}
    for ex, key in zip(train, train_keys, strict=True):
        if key is not None and ex.label is not None:
            labels_of.setdefault(key, set()).add(ex.label)
    conflicting = [key for key, labels in labels_of.items() if len(labels) > 1]
    where_of = {key: ex.where for ex, key in zip(train, train_keys, strict=True) if key is not None}
    leaked = [ex.where for ex, key in zip(held_out, held_keys, strict=True) if key is not None and key in copies]
    total = len(train) + len(held_out)
    held_note = "held-out images equal to a training image" if held_out else "no validation/test file given"
    findings = (
        limited(
            "unreadable",
            problems,
            total,
            t,
            "replace or remove these images; under data.quality: warn they are skipped",
            "each image opened and fully decoded",
        ),
        limited(
            "duplicates",
            duplicates,
            len(train),
            t,
            "remove the extra copies (the first is kept)",
            "the same pixels (or file bytes) under any name",
        ),
        limited(
            "conflicting",
            [f"{where_of[k]}: {sorted(labels_of[k])}" for k in conflicting],
            len(train),
            t,
            "give each image one label, or remove it",
        ),
        limited(
            "leakage",
            leaked,
            len(held_out),
            t,
            "remove these images from validation/test (or from training)",
            held_note,
            checked=bool(held_out),
        ),
        _label_balance(train, cfg),
    )
    origin = source or cfg.train
    return QualityReport(origin, "image-classification", total, findings, "words", unreadable=tuple(unreadable))


def _keys(examples: Sequence[ImageExample], unreadable: list[str], problems: list[str]) -> list[str | None]:
    """Each example's content key after decoding it once (None where it cannot be read)."""
    keys: list[str | None] = []
    for ex in examples:
        try:
            data = ex.image if not isinstance(ex.image, str) else _read_bytes(ex.image, ex.where)
            open_image(data if isinstance(data, bytes) else ex.image, ex.where)
            keys.append(content_key(data))
        except DataError as exc:
            unreadable.append(ex.where)
            problems.append(str(exc))
            keys.append(None)
    return keys


def _read_bytes(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise DataError(f"{where}: cannot read the image file ({exc.strerror or exc})") from None


def _firsts_skipped(examples: Sequence[ImageExample], keys: Sequence[str | None]):
    seen: set[str] = set()
    for ex, key in zip(examples, keys, strict=True):
        if key is None:
            continue
        if key in seen:
            yield ex, key
        seen.add(key)


def _label_balance(train: Sequence[ImageExample], cfg: DataConfig) -> Finding:
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
        fix="add images of the rarest label, or lower data.thresholds.min_class_share",
        examples=tuple(f"{label}: {count}" for label, count in list(ordered.items())[:_SHOWN]),
        detail=f"rarest label {rarest!r}; count and share are its images" if ordered else "no labelled images",
        stats={"labels": ordered, "rarest": rarest},
    )
