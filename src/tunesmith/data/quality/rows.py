"""What the streamed gate knows about one row (`RowFacts`) and about its encoding (`Measure`): a
task's `RowChecks` (scan.py) makes them with the task's own readers, so a row the check passes is a
row training can read, and its problem is reported in the same words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["Measure", "RowFacts", "normalize", "row_problem"]


@dataclass(frozen=True)
class RowFacts:
    """One row, as the checks see it.

    Attributes:
        status: "ok", "schema_error" (not readable as the task's record) or "empty".
        problem: for a schema error or an empty row, what is wrong and the fix.
        text: what is compared for duplicates and leakage (a text and its pair; every chat turn).
        label: the label (after `label_map`), for tasks whose rows carry one.
        example: the task's example, which `RowChecks.measure` reads.
        notes: (tally, note) pairs the task found while reading, e.g. ("role_order", "...").
    """

    status: Literal["ok", "schema_error", "empty"]
    problem: str = ""
    text: str = ""
    label: str | None = None
    example: Any = None
    notes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Measure:
    """One row, encoded.

    Attributes:
        length: tokens (or words, without a tokenizer) before `max_length` applies.
        untrainable: why no token would be trained ("" when some is, or the task trains every row).
        missing_eos: the row is trained but its last trained EOS is cut off by `max_length`, or the
            tokenizer has no EOS.
        error: the row cannot be rendered (e.g. a chat template error); "" when it can.
    """

    length: int
    untrainable: str = ""
    missing_eos: bool = False
    error: str = ""


def normalize(text: str) -> str:
    """The text compared for exact duplicates: lower case, runs of whitespace as one space."""
    return " ".join(text.lower().split())


def row_problem(message: str, where: str) -> str:
    """The problems of one row from a reader's error about that row alone, without its origin."""
    lines = [line.strip() for line in message.splitlines()[1:] if line.strip()]
    problems = [line.removeprefix(f"{where}: ") for line in lines]
    return "; ".join(problems) or message
