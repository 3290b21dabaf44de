"""Turn rows into classification examples and settle the label set.

Every bad row is collected before raising, so one `DataError` lists what to fix in the whole file.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from tunesmith.data.readers import Row
from tunesmith.errors import DataError

__all__ = [
    "MAX_REPORTED_ERRORS",
    "Example",
    "check_known_labels",
    "resolve_labels",
    "short_repr",
    "summarize_problems",
    "to_examples",
]

MAX_REPORTED_ERRORS = 20

_T = TypeVar("_T")


@dataclass(frozen=True)
class Example:
    """One text (or text pair) classification example.

    Attributes:
        text: the input text, exactly as in the file.
        label: the label as a string; None when the data has no labels (prediction input).
        text_pair: the second text of a pair task (NLI, QA), or None.
        where: the row's origin (`file.jsonl:12`).
    """

    text: str
    label: str | None
    text_pair: str | None = None
    where: str = ""

    def key(self) -> str:
        """What splits and samples hash: the text and its pair, so exact copies share a side."""
        return self.text + "\x00" + (self.text_pair or "")


class _RowError(Exception):
    """A problem with one field of one row (collected, then reported together)."""


def to_examples(
    rows: Sequence[Row],
    text_field: str,
    label_field: str | None,
    text_pair_field: str | None = None,
    label_map: Mapping[str, str] | None = None,
    require_labels: bool = True,
) -> list[Example]:
    """Build examples from rows, checking every row.

    Labels may be strings (surrounding whitespace removed), integers, booleans (`"true"`/`"false"`)
    or whole-number floats (`1.0` -> `"1"`); `label_map` then renames them (labels not in the map are
    kept). With `require_labels=False` a missing, null or empty label gives `label=None`.

    Raises:
        DataError: listing every bad row (the first 20 of them): a missing field, empty or
            non-string text, or a label that is missing, null, empty or not a string/integer.
    """
    if require_labels and label_field is None:
        raise DataError("labels are required but no label field is set; set data.label_field")
    label_map = label_map or {}
    examples: list[Example] = []
    problems: list[str] = []
    for row in rows:
        row_problems: list[str] = []
        text = _attempt(row_problems, row, _text, text_field)
        pair = _attempt(row_problems, row, _text, text_pair_field) if text_pair_field is not None else None
        label = None
        if label_field is not None:
            label = _attempt(row_problems, row, partial(_label, required=require_labels), label_field)
        problems.extend(row_problems)
        if not row_problems and text is not None:
            label = label_map.get(label, label) if label is not None else None
            examples.append(Example(text=text, label=label, text_pair=pair, where=row.where))
    if problems:
        raise DataError(summarize_problems(problems, "problem(s) in the data; fix them all, then run again"))
    return examples


def resolve_labels(train: Sequence[Example], configured: Sequence[str] | None = None) -> list[str]:
    """The label order of the classifier.

    Args:
        train: the training examples (all labelled).
        configured: `data.labels`, the label order to use; every training label must be in it.

    Returns:
        `configured` if given, else the sorted unique training labels.

    Raises:
        DataError: no examples, an unlabelled example, a training label missing from
            `configured`, a repeated configured label, or fewer than two classes.
    """
    if not train:
        raise DataError("no training examples; add rows to data.train")
    unlabelled = next((ex for ex in train if ex.label is None), None)
    if unlabelled is not None:
        raise DataError(
            f"{unlabelled.where}: training example without a label; "
            "every training row needs a label (check data.label_field)"
        )
    first_seen = _first_seen(train)
    if len(first_seen) < 2:
        (only,) = first_seen
        raise DataError(f"only one class {only!r} in the training data; classification needs at least two")
    if configured is None:
        return sorted(first_seen)
    repeated = sorted(label for label, count in Counter(configured).items() if count > 1)
    if repeated:
        raise DataError(f"data.labels lists {', '.join(map(repr, repeated))} more than once; list each label once")
    unknown = [f"{label!r} (e.g. {where})" for label, where in first_seen.items() if label not in configured]
    if unknown:
        raise DataError(
            f"training label(s) not in data.labels: {', '.join(unknown)}; "
            f"data.labels is {list(configured)}: add them to it or fix the data"
        )
    return list(configured)


def check_known_labels(examples: Sequence[Example], labels: Sequence[str], source: str) -> None:
    """Check that every labelled example uses a known label (unlabelled examples are skipped).

    Args:
        examples: evaluation examples (validation, test).
        labels: the classifier's labels, from `resolve_labels`.
        source: what the examples are, for the message (`data.validation`).

    Raises:
        DataError: naming each unknown label, a line where it occurs, and the known labels.
    """
    known = set(labels)
    unknown = {label: where for label, where in _first_seen(examples).items() if label not in known}
    if unknown:
        found = ", ".join(f"{label!r} (e.g. {where})" for label, where in unknown.items())
        raise DataError(
            f"{source}: label(s) not seen in training: {found}; known labels: "
            f"{', '.join(labels)}. Evaluation labels must be seen in training: fix the "
            "labels (data.label_map can rename them) or add such examples to the training data"
        )


def _first_seen(examples: Sequence[Example]) -> dict[str, str]:
    """Each label (None excluded) with the origin of its first example, in order of appearance."""
    seen: dict[str, str] = {}
    for ex in examples:
        if ex.label is not None and ex.label not in seen:
            seen[ex.label] = ex.where
    return seen


def _attempt(problems: list[str], row: Row, get: Callable[[Row, str], _T], field: str) -> _T | None:
    """`get(row, field)`, or None after recording `where: problem` when the row has a problem."""
    try:
        return get(row, field)
    except _RowError as e:
        problems.append(f"{row.where}: {e}")
        return None


def _text(row: Row, field: str) -> str:
    value = _field(row, field, "data.text_field")
    if value is None:
        raise _RowError(f"field {field!r} is null; give it a text or remove the row")
    if not isinstance(value, str):
        raise _RowError(
            f"field {field!r} must be a string, got {type(value).__name__} ({short_repr(value)}); "
            "quote it or fix data.text_field"
        )
    if not value.strip():
        raise _RowError(f"empty text in field {field!r}; remove the row or fix it")
    return value


def _label(row: Row, field: str, required: bool) -> str | None:
    if field not in row.data and not required:
        return None
    value = _field(row, field, "data.label_field")
    if _is_blank(value):
        if not required:
            return None
        kind = "null" if value is None or isinstance(value, float) else "empty"
        raise _RowError(f"{kind} label in field {field!r}; give the row a label or remove it")
    return _label_text(value, field)


def _label_text(value: Any, field: str) -> str:
    """A label value as a string: str, int, bool or whole-number float."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    raise _RowError(
        f"label {short_repr(value)} in field {field!r} is not a string or whole number; "
        "use class names or integer class ids"
    )


def _field(row: Row, field: str, setting: str) -> Any:
    if field not in row.data:
        present = ", ".join(row.data) or "none"
        raise _RowError(f"missing field {field!r} (fields present: {present}); set {setting} or data.column_map")
    return row.data[field]


def _is_blank(value: Any) -> bool:
    """Null, NaN (a missing number in pandas-written files) or a whitespace-only string."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    return isinstance(value, str) and not value.strip()


def short_repr(value: Any, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters for an error message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summarize_problems(errors: list[str], headline: str) -> str:
    """One message listing the first MAX_REPORTED_ERRORS problems (and how many more there are)."""
    shown = errors[:MAX_REPORTED_ERRORS]
    lines = [f"{len(errors)} {headline}:", *(f"  {error}" for error in shown)]
    if len(errors) > len(shown):
        lines.append(f"  ... and {len(errors) - len(shown)} more")
    return "\n".join(lines)
