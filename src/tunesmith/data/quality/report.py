"""The data quality report: one finding per check, each against its configured limit, and the gate
that stops (or warns before) training when a limit is breached."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Literal

from tunesmith.errors import DataError

__all__ = ["CleanSummary", "Finding", "QualityReport", "gate", "limited"]


@dataclass(frozen=True)
class Finding:
    """The result of one check.

    Attributes:
        name: the check (schema_errors, empty, duplicates, near_duplicates, conflicting, leakage,
            label_balance, overlong, untrainable, missing_eos, role_order; for audio also unreadable,
            silent and sample_rates).
        count: rows found (conflicting: texts; leakage: validation/test rows; label_balance: rows
            of the rarest label).
        total: what `count` is a share of (rows checked; leakage: reference rows compared).
        limit: the configured limit, or None for a check without one (reported only).
        limit_kind: how `limit` applies: at most `count` rows, at most a `share`, or at least a
            `min_share`.
        setting: the config path of the limit, e.g. `data.thresholds.max_empty`.
        fix: what to do when the check fails.
        checked: False when the check could not run (e.g. it needs the model's tokenizer).
        examples: up to five rows found, as `where` with a note.
        detail: one line on how the check was made, or why it was not.
        stats: numbers beyond the count (length percentiles, rows per label, ...).
    """

    name: str
    count: int
    total: int
    limit: float | None
    limit_kind: Literal["count", "share", "min_share"] | None
    setting: str = ""
    fix: str = ""
    checked: bool = True
    examples: tuple[str, ...] = ()
    detail: str = ""
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def share(self) -> float:
        return self.count / self.total if self.total else 0.0

    @property
    def passed(self) -> bool:
        if not self.checked or self.limit is None:
            return True
        if self.limit_kind == "count":
            return self.count <= self.limit
        if self.limit_kind == "share":
            return self.share <= self.limit
        return self.total == 0 or self.share >= self.limit

    def limit_text(self) -> str:
        """The limit as a person reads it: `<= 0`, `<= 5.0%`, `>= 10.0%`, or `-`."""
        if self.limit is None:
            return "-"
        if self.limit_kind == "count":
            return f"<= {self.limit:g}"
        return f"{'<=' if self.limit_kind == 'share' else '>='} {self.limit:.1%}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "count": self.count,
            "total": self.total,
            "share": self.share,
            "limit": self.limit,
            "limit_kind": self.limit_kind,
            "setting": self.setting,
            "passed": self.passed,
            "checked": self.checked,
            "examples": list(self.examples),
            "detail": self.detail,
            "fix": self.fix,
            "stats": self.stats,
        }


# check -> (its threshold in data.thresholds, how the limit applies)
_LIMITS: dict[str, tuple[str, Literal["count", "share"]]] = {
    "duplicates": ("max_duplicate_share", "share"),
    "conflicting": ("max_conflicting", "count"),
    "leakage": ("max_leakage", "count"),
    "unreadable": ("max_unreadable", "count"),
    "silent": ("max_silent", "count"),
    "overlong": ("max_overlong_share", "share"),
}


def limited(
    name: str, found: list[str], total: int, thresholds: Any, fix: str, detail: str = "", checked: bool = True
) -> Finding:
    """The finding of check `name` (duplicates, conflicting, leakage, unreadable, overlong) against its
    threshold: `found` are the rows found, as `where` notes (the first five are shown)."""
    setting, kind = _LIMITS[name]
    return Finding(
        name,
        len(found),
        total,
        getattr(thresholds, setting),
        kind,
        f"data.thresholds.{setting}",
        fix,
        checked=checked,
        examples=tuple(found[:5]),
        detail=detail,
    )


@dataclass(frozen=True)
class CleanSummary:
    """What `clean_file` wrote: the kept rows, and every dropped row with its reason."""

    output: str
    dropped_file: str
    kept: int
    dropped: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "dropped_file": self.dropped_file,
            "kept": self.kept,
            "dropped": dict(self.dropped),
        }


@dataclass(frozen=True)
class QualityReport:
    """Every check on one data file.

    Attributes:
        source: the file checked.
        task: the task whose checks ran.
        rows: records read, unreadable ones included.
        findings: one per check, in a fixed order.
        length_unit: "tokens" (the model's tokenizer), "words" (none was given) or "seconds" (audio).
        cleaned: what `clean_file` wrote, when the report comes from it.
        unreadable: origins of images or clips that could not be read (skipped under warn).
    """

    source: str
    task: str
    rows: int
    findings: tuple[Finding, ...]
    length_unit: Literal["tokens", "words", "seconds"]
    cleaned: CleanSummary | None = None
    unreadable: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return all(f.passed for f in self.findings)

    @property
    def failed(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.passed)

    def finding(self, name: str) -> Finding:
        """The finding of one check, by name."""
        for f in self.findings:
            if f.name == name:
                return f
        raise KeyError(f"no check named {name!r}; checks: {', '.join(f.name for f in self.findings)}")

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "source": self.source,
            "task": self.task,
            "rows": self.rows,
            "passed": self.passed,
            "failed": [f.name for f in self.failed],
            "length_unit": self.length_unit,
            "findings": [f.to_dict() for f in self.findings],
            "cleaned": self.cleaned.to_dict() if self.cleaned else None,
            "unreadable": list(self.unreadable),
        }


def gate(report: QualityReport, mode: Literal["fail", "warn", "off"]) -> None:
    """The quality gate before training (`data.quality`).

    Args:
        report: the checks on the training data.
        mode: "fail" raises on any failed check, "warn" prints one line per failed check to
            stderr, "off" does nothing.

    Raises:
        DataError: under "fail", listing each failed check with its count, limit and fix.
    """
    if mode == "off" or report.passed:
        return
    lines = [_failure_line(f) for f in report.failed]
    if mode == "warn":
        for line in lines:
            print(f"warning: data quality: {report.source}: {line}", file=sys.stderr)
        return
    raise DataError(
        f"{report.source}: {len(lines)} data quality check(s) failed:\n"
        + "\n".join(f"  {line}" for line in lines)
        + f"\nWrite a cleaned copy with `tunesmith data clean {report.source} -o CLEANED.jsonl`, change the "
        "limits under data.thresholds, or set data.quality: warn to train anyway"
    )


def _failure_line(f: Finding) -> str:
    found = f"{f.count} ({f.share:.1%})" if f.limit_kind != "count" else str(f.count)
    return f"{f.name}: {found}, limit {f.limit_text()} ({f.setting}); {f.fix}"
