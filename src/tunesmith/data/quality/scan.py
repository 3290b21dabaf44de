"""The streamed pass behind `tunesmith data check` and `data clean`.

Rows arrive in batches; each keeps a few bytes of state whatever its length (a 64-bit hash of its
normalised text, a 128-byte MinHash signature and its band keys, its label, a reason code), so a
million rows fit in a few hundred MB. Every row gets one reason: kept, or why `clean` drops it.
The pass is the same for every task that checks rows; what is task-specific comes from the task's
`RowChecks`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tunesmith.config import DataConfig
from tunesmith.data.quality.keyindex import GrowingArray, KeyIndex
from tunesmith.data.quality.minhash import NearDuplicateIndex, signatures
from tunesmith.data.quality.report import Finding
from tunesmith.data.quality.rows import Measure, RowFacts, normalize
from tunesmith.data.readers import Row, UnreadableRow

__all__ = ["BATCH", "BATCH_CHARS", "REASONS", "RowChecks", "Scan", "Tally"]

BATCH = 2048  # rows checked at once
BATCH_CHARS = 1_000_000  # ... or fewer, when their texts are longer than this in all
# Why a row is dropped by `clean`, in order of precedence; code = position.
REASONS = ("kept", "schema_error", "empty", "duplicate", "conflicting", "near_duplicate", "leakage", "untrainable")
KEPT, SCHEMA, EMPTY, DUPLICATE, CONFLICTING, NEAR, LEAKAGE, UNTRAINABLE = range(len(REASONS))
_EXAMPLES = 5
_TALLIES = (
    "schema_errors",
    "empty",
    "duplicates",
    "near_duplicates",
    "conflicting",
    "leakage",
    "overlong",
    "untrainable",
    "missing_eos",
)


class RowChecks(Protocol):
    """A task's part of the streamed gate."""

    task: str  # the task's name, for the report
    labelled: bool  # a copy with another label is a conflict (not a duplicate), and labels are counted
    tallies: tuple[str, ...]  # tallies of its own, filled from `RowFacts.notes` (e.g. role_order)

    def inspect(self, row: Row) -> RowFacts:
        """Read one row as training would."""

    def measure(self, facts: Sequence[RowFacts], tokenizer: Any | None) -> list[Measure]:
        """Lengths (and what stays trained) of readable rows, as training would encode them."""

    def findings(self, scan: Scan) -> tuple[Finding, ...]:
        """Its findings after the common ones (schema errors, empty rows, duplicates, near duplicates)."""


@dataclass
class Tally:
    """How many rows a check found, and the first few, as `where` with a note."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(example)


class _WhereBook:
    """Each row's origin in 4 bytes: the line number when it is `<file>:<line>`, else the string."""

    def __init__(self) -> None:
        self._prefix: str | None = None
        self._lines = GrowingArray(np.int32, fill=-1)
        self._other: dict[int, str] = {}

    def add(self, first: int, wheres: Sequence[str]) -> None:
        lines = np.full(len(wheres), -1, dtype=np.int32)
        for i, where in enumerate(wheres):
            head, _, tail = where.rpartition(":")
            if self._prefix is None:
                self._prefix = head
            if head == self._prefix and tail.isdigit():
                lines[i] = int(tail)
            else:
                self._other[first + i] = where
        self._lines.set(np.arange(first, first + len(wheres)), lines)

    def get(self, row: int) -> str:
        line = int(self._lines.data[row])
        return f"{self._prefix}:{line}" if line >= 0 else self._other[row]


class Scan:
    """The state of one pass over training rows (then, optionally, validation/test rows).

    Attributes:
        rows: records seen, unreadable ones included.
        reasons: per row, the code in REASONS of why `clean` drops it (final after `finish`).
        related: per row, the earlier row it repeats (duplicate, near duplicate, conflicting);
            for untrainable rows the index of the reason in `untrainable_why`.
        notes: problems of rows that could not be rendered (found when encoding, not reading).
        leaked: training row -> the validation/test row equal or near-equal to it.
        conflicts: first row of a text -> the labels the text has.
    """

    def __init__(self, cfg: DataConfig, checks: RowChecks, tokenizer: Any | None) -> None:
        self.cfg, self.checks, self.tokenizer = cfg, checks, tokenizer
        self.rows = 0
        self.wheres = _WhereBook()
        self.reasons = GrowingArray(np.uint8)
        self.related = GrowingArray(np.int32, fill=-1)
        self.notes: dict[int, str] = {}
        self.leaked: dict[int, str] = {}
        self.conflicts: dict[int, set[str]] = {}
        self.conflicting_rows = 0
        self.untrainable_why: list[str] = []
        self.tally = {name: Tally() for name in (*_TALLIES, *checks.tallies)}
        self.label_counts: Counter[str] = Counter()
        self.length_counts = np.zeros(1, dtype=np.int64)  # rows of each length
        self.reference_rows = self.reference_unusable = 0
        self.reference_given = False
        self.near = NearDuplicateIndex(cfg.thresholds.near_duplicate_jaccard)
        self._exact = KeyIndex(np.uint64)
        self._label_of = GrowingArray(np.int32, fill=-1)
        self._label_ids: dict[str, int] = {}

    # ------------------------------------------------------------------------- training rows

    def add(self, items: Sequence[Row | UnreadableRow]) -> None:
        """Check one batch of training rows."""
        first, self.rows = self.rows, self.rows + len(items)
        # Every per-row array covers every row read, set or not (`finish` slices them to `rows`).
        self.reasons.reserve(self.rows)
        self.related.reserve(self.rows)
        self.wheres.add(first, [item.where for item in items])
        facts = [self._inspect(item) for item in items]
        codes = np.zeros(len(items), dtype=np.uint8)
        for i, fact in enumerate(facts):
            for tally, note in fact.notes if fact.status == "ok" else ():
                self.tally[tally].add(f"{items[i].where}: {note}")
        untrainable = self._measure(first, facts)
        for i, fact in enumerate(facts):
            if fact.status != "ok":
                codes[i] = SCHEMA if fact.status == "schema_error" else EMPTY
                name = "schema_errors" if fact.status == "schema_error" else "empty"
                self.tally[name].add(f"{items[i].where}: {fact.problem}")
        ok = [i for i, fact in enumerate(facts) if fact.status == "ok"]
        if ok:
            self._compare(first, np.array(ok), [facts[i] for i in ok], codes)
        for i, why in untrainable.items():
            if codes[i] == KEPT:
                codes[i] = UNTRAINABLE
                self.related.set(np.array([first + i]), self._why_code(why))
        self.reasons.set(np.arange(first, self.rows), codes)

    def _inspect(self, item: Row | UnreadableRow) -> RowFacts:
        if isinstance(item, UnreadableRow):
            return RowFacts("schema_error", problem=item.problem)
        return self.checks.inspect(item)

    def _measure(self, first: int, facts: list[RowFacts]) -> dict[int, str]:
        """Lengths, and what stays trained; returns the untrainable rows with the reason.

        A row that cannot be rendered becomes a schema error in `facts`.
        """
        ok = [i for i, fact in enumerate(facts) if fact.status == "ok"]
        measures = self.checks.measure([facts[i] for i in ok], self.tokenizer)
        for i, measure in zip(ok, measures, strict=True):
            if measure.error:
                facts[i] = RowFacts("schema_error", problem=f"cannot be rendered: {measure.error}")
                self.notes[first + i] = facts[i].problem
        kept = [(i, m) for i, m in zip(ok, measures, strict=True) if not m.error]
        self._count_lengths(first, [i for i, _ in kept], [m.length for _, m in kept])
        untrainable: dict[int, str] = {}
        for i, measure in kept:
            where = self.wheres.get(first + i)
            if measure.untrainable:
                untrainable[i] = measure.untrainable
                self.tally["untrainable"].add(f"{where}: {measure.untrainable}")
            if measure.missing_eos:
                self.tally["missing_eos"].add(where)
        return untrainable

    def _count_lengths(self, first: int, positions: list[int], lengths: Sequence[int]) -> None:
        if not lengths:
            return
        counts = np.bincount(np.asarray(lengths, dtype=np.int64))
        if len(counts) > len(self.length_counts):
            self.length_counts = np.pad(self.length_counts, (0, len(counts) - len(self.length_counts)))
        self.length_counts[: len(counts)] += counts
        unit = "tokens" if self.tokenizer is not None else "words"
        for i, length in zip(positions, lengths, strict=True):
            if length > self.cfg.max_length:
                self.tally["overlong"].add(f"{self.wheres.get(first + i)}: {length} {unit}")

    def _compare(self, first: int, ok: np.ndarray, facts: list[RowFacts], codes: np.ndarray) -> None:
        """Exact duplicates, conflicting labels and near duplicates of the readable rows.

        A copy of an earlier text is a duplicate when it has the same label (unlabelled rows: always), else a
        conflict; near duplicates are looked for among texts not seen before.
        """
        rows = first + ok
        keys = np.fromiter((hash(normalize(f.text)) for f in facts), dtype=np.int64, count=len(facts))
        self._exact.add(keys.view(np.uint64), rows)
        groups = self._exact.first(keys.view(np.uint64))
        repeated = groups != rows
        self.related.set(rows[repeated], groups[repeated])
        duplicate = repeated
        if self.checks.labelled:
            duplicate = repeated & ~self._check_labels(rows, groups, repeated, [f.label or "" for f in facts])
        codes[ok[duplicate]] = DUPLICATE
        for row, group in zip(rows[duplicate], groups[duplicate], strict=True):
            self.tally["duplicates"].add(f"{self.wheres.get(row)} (same text as {self.wheres.get(group)})")
        distinct = np.flatnonzero(~repeated)
        if not len(distinct):
            return
        best, similarity = self.near.add(rows[distinct], signatures([facts[j].text for j in distinct]))
        near = best >= 0
        codes[ok[distinct[near]]] = NEAR
        self.related.set(rows[distinct[near]], best[near])
        for row, earlier, jaccard in zip(rows[distinct[near]], best[near], similarity[near], strict=True):
            note = f"Jaccard ~{jaccard:.2f} with {self.wheres.get(earlier)}"
            self.tally["near_duplicates"].add(f"{self.wheres.get(row)} ({note})")

    def _check_labels(
        self, rows: np.ndarray, groups: np.ndarray, repeated: np.ndarray, labels: list[str]
    ) -> np.ndarray:
        """Count labels; remember texts that came back with another label, and return which rows did."""
        self.label_counts.update(labels)
        ids = np.array([self._label_ids.setdefault(label, len(self._label_ids)) for label in labels], dtype=np.int32)
        self._label_of.set(rows, ids)
        names = list(self._label_ids)
        clash = repeated & (self._label_of.get(groups) != ids)
        for j in np.flatnonzero(clash):
            group = int(groups[j])
            if group not in self.conflicts:
                self.conflicts[group] = {names[self._label_of.data[group]]}
                note = f"{names[self._label_of.data[group]]!r} here, {labels[j]!r} at {self.wheres.get(int(rows[j]))}"
                self.tally["conflicting"].add(f"{self.wheres.get(group)} ({note})")
            self.conflicts[group].add(labels[j])
        return clash

    def _why_code(self, why: str) -> int:
        if why not in self.untrainable_why:
            self.untrainable_why.append(why)
        return self.untrainable_why.index(why)

    # ------------------------------------------------------------------- validation/test rows

    def add_reference(self, items: Sequence[Row | UnreadableRow]) -> None:
        """Check one batch of validation/test rows for leakage: equal or near-equal to a training row."""
        self.reference_given = True
        usable = [(item.where, fact) for item in items if (fact := self._inspect(item)).status == "ok"]
        self.reference_rows += len(usable)
        self.reference_unusable += len(items) - len(usable)
        if not usable:
            return
        keys = np.fromiter((hash(normalize(f.text)) for _, f in usable), dtype=np.int64, count=len(usable))
        equal = self._exact.first(keys.view(np.uint64))
        rest = np.flatnonzero(equal < 0)
        near = np.full(len(usable), -1, dtype=np.int64)
        similarity = np.zeros(len(usable))
        if len(rest):
            near[rest], similarity[rest] = self.near.query(signatures([usable[j][1].text for j in rest]))
        for j, (where, _) in enumerate(usable):
            if equal[j] >= 0:
                self._leak(int(equal[j]), where, None)
            elif near[j] >= 0:
                self._leak(int(near[j]), where, float(similarity[j]))

    def _leak(self, row: int, where: str, similarity: float | None) -> None:
        """Record that validation/test row `where` equals (or, with a similarity, nearly equals) `row`."""
        how = "equal to" if similarity is None else "near-equal to"
        note = "" if similarity is None else f" (Jaccard ~{similarity:.2f})"
        self.tally["leakage"].add(f"{where} {how} {self.wheres.get(row)}{note}")
        self.leaked.setdefault(row, f"{how} {where}{note}")

    # ------------------------------------------------------------------------------ the end

    def finish(self) -> None:
        """Settle the reasons that are only known at the end: conflicting labels and leakage."""
        reasons = self.reasons.data[: self.rows]
        related = self.related.data[: self.rows]
        if self.conflicts:
            firsts = np.fromiter(self.conflicts, dtype=np.int64, count=len(self.conflicts))
            rows = np.arange(self.rows)
            # The first row of each such text, and its copies: rows whose `related` is that first
            # row and that are kept so far (a copy with another label) or duplicates.
            is_first = np.isin(rows, firsts)
            member = is_first | (np.isin(reasons, (KEPT, DUPLICATE)) & np.isin(related, firsts))
            related[is_first] = rows[is_first]
            reasons[member] = CONFLICTING
            self.conflicting_rows = int(member.sum())
        for row in self.leaked:
            if reasons[row] in (KEPT, UNTRAINABLE):
                reasons[row], related[row] = LEAKAGE, -1

    def dropped(self) -> dict[str, int]:
        """Rows per reason, kept rows included (call after `finish`)."""
        counts = np.bincount(self.reasons.data[: self.rows], minlength=len(REASONS))
        return {name: int(counts[code]) for code, name in enumerate(REASONS)}

    def detail(self, row: int, problem: str) -> str:
        """Why `clean` drops a row, in words (call after `finish`); `problem` is its reading problem."""
        reason, related = int(self.reasons.data[row]), int(self.related.data[row])
        if reason in (SCHEMA, EMPTY):
            return self.notes.get(row, problem)
        if reason == DUPLICATE:
            return f"same text as {self.wheres.get(related)}"
        if reason == NEAR:
            return f"near duplicate of {self.wheres.get(related)}"
        if reason == CONFLICTING:
            labels = ", ".join(sorted(map(repr, self.conflicts[related])))
            return f"the text has labels {labels} (first at {self.wheres.get(related)}); every copy is dropped"
        if reason == LEAKAGE:
            return self.leaked[row]
        return self.untrainable_why[related]
