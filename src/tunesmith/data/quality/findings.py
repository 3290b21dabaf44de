"""Turn the counts of a finished scan into findings, each against its limit in `data.thresholds`.

`findings` lists the checks every task has (schema errors, empty rows, duplicates, near duplicates),
then the ones the task's `RowChecks.findings` lists, built with the functions below.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np

from tunesmith.data.quality.report import Finding
from tunesmith.data.quality.scan import Scan

__all__ = [
    "conflicting",
    "findings",
    "label_balance",
    "leakage",
    "limited_tally",
    "missing_eos",
    "overlong",
    "untrainable",
]

_CLEAN = "`tunesmith data clean` drops them"
_KEEP_FIRST = "`tunesmith data clean` keeps the first copy"
_DUPLICATES = "copies of an earlier row (case and whitespace aside); a copy with another label is conflicting instead"
_NO_TOKENIZER = "needs the model's tokenizer: give --config (or a tokenizer to the Python API)"
# tally -> its threshold in data.thresholds, where that is not max_<tally>
_SETTINGS = {"duplicates": "max_duplicate_share", "near_duplicates": "max_near_duplicate_share"}


def findings(scan: Scan) -> tuple[Finding, ...]:
    """Every check for the scan's task, in a fixed order: the common ones, then the task's own."""
    t = scan.cfg.thresholds
    rows = scan.rows  # shares are of every row checked, unreadable ones included
    common = (
        limited_tally(scan, "schema_errors", t.max_schema_errors, "count", f"fix or remove these rows ({_CLEAN})"),
        limited_tally(scan, "empty", t.max_empty, "count", f"write or remove these rows ({_CLEAN})"),
        limited_tally(scan, "duplicates", t.max_duplicate_share, "share", _KEEP_FIRST, detail=_DUPLICATES),
        _near_duplicates(scan, rows),
    )
    return (*common, *scan.checks.findings(scan))


def limited_tally(
    scan: Scan,
    name: str,
    limit: float,
    kind: Literal["count", "share"],
    fix: str,
    detail: str = "",
    setting: str | None = None,
) -> Finding:
    """The finding of tally `name` against `limit` (a share of every row checked, or a count);
    `setting` names the threshold (default `max_<name>`)."""
    return _limited(scan, name, scan.rows, limit, kind, fix, detail=detail, setting=setting)


def _limited(
    scan: Scan,
    name: str,
    total: int,
    limit: float,
    kind: Literal["count", "share"],
    fix: str,
    detail: str = "",
    checked: bool = True,
    stats: dict[str, Any] | None = None,
    setting: str | None = None,
) -> Finding:
    """A finding whose count is the tally of the same name."""
    tally = scan.tally[name]
    setting = setting or _SETTINGS.get(name, f"max_{name}")
    return Finding(
        name,
        tally.count,
        total,
        limit,
        kind,
        setting=f"data.thresholds.{setting}",
        fix=fix,
        checked=checked,
        examples=tuple(tally.examples),
        detail=detail,
        stats=stats or {},
    )


def _near_duplicates(scan: Scan, total: int) -> Finding:
    near = scan.near
    detail = (
        f"MinHash over word shingles, {near.bands} LSH bands of {near.rows_per_band}; estimated Jaccard "
        f">= {near.threshold} with an earlier row (exact duplicates not counted)"
    )
    fix = "`tunesmith data clean` keeps the first of each group; or raise data.thresholds.near_duplicate_jaccard"
    return _limited(
        scan, "near_duplicates", total, scan.cfg.thresholds.max_near_duplicate_share, "share", fix, detail=detail
    )


def conflicting(scan: Scan) -> Finding:
    """Texts with more than one label (labelled rows)."""
    detail = f"texts (normalised case and whitespace) with more than one label; {scan.conflicting_rows} rows carry them"
    fix = f"give each text one label ({_CLEAN}, every copy)"
    stats = {"rows": scan.conflicting_rows}
    return _limited(
        scan, "conflicting", scan.rows, scan.cfg.thresholds.max_conflicting, "count", fix, detail=detail, stats=stats
    )


def leakage(scan: Scan) -> Finding:
    """Validation/test rows equal or near-equal to a training row."""
    fix = (
        "remove those rows from the validation/test file, "
        "or drop their training copies with `tunesmith data clean --validation`"
    )
    if not scan.reference_given:
        detail = "not checked: no validation or test file given (--validation, or data.validation / data.test files)"
        return _limited(scan, "leakage", 0, scan.cfg.thresholds.max_leakage, "count", fix, checked=False, detail=detail)
    detail = f"validation/test rows equal or near-equal to a training row, of {scan.reference_rows} compared"
    if scan.reference_unusable:
        detail += f"; {scan.reference_unusable} unreadable or empty validation/test rows were not compared"
    return _limited(scan, "leakage", scan.reference_rows, scan.cfg.thresholds.max_leakage, "count", fix, detail=detail)


def label_balance(scan: Scan) -> Finding:
    """The rarest label's share of the rows (labelled rows)."""
    counts = {label: scan.label_counts.get(label, 0) for label in scan.cfg.labels or []}
    counts.update(scan.label_counts)
    ordered = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    rarest = min(ordered, key=lambda label: (ordered[label], label)) if ordered else ""
    total = sum(ordered.values())
    return Finding(
        "label_balance",
        ordered.get(rarest, 0),
        total,
        scan.cfg.thresholds.min_class_share,
        "min_share",
        setting="data.thresholds.min_class_share",
        fix="add rows of the rarest label, or lower data.thresholds.min_class_share",
        examples=tuple(f"{label}: {count}" for label, count in list(ordered.items())[:5]),
        detail=f"rarest label {rarest!r}; count and share are its rows" if ordered else "no labelled rows",
        stats={"labels": ordered, "rarest": rarest},
    )


def overlong(scan: Scan) -> Finding:
    """Rows longer than data.max_length, with the length distribution."""
    cfg = scan.cfg
    unit = "tokens" if scan.tokenizer is not None else "words"
    over = scan.tally["overlong"].count
    action = {"truncate": "would be truncated", "drop": "would be dropped", "error": "would stop training"}
    how = "the model's tokenizer" if scan.tokenizer is not None else "whitespace words, as no tokenizer was given"
    stats: dict[str, object] = {
        "unit": unit,
        "max_length": cfg.max_length,
        **_percentiles(scan.length_counts),
        "truncated": over if cfg.overlong == "truncate" else 0,
        "dropped": over if cfg.overlong == "drop" else 0,
    }
    error = cfg.overlong == "error"
    return Finding(
        "overlong",
        over,
        scan.rows,
        0 if error else cfg.thresholds.max_overlong_share,
        "count" if error else "share",
        setting="data.overlong" if error else "data.thresholds.max_overlong_share",
        fix="raise data.max_length, shorten those rows, or set data.overlong",
        examples=tuple(scan.tally["overlong"].examples),
        detail=f"lengths in {how}; {over} rows over data.max_length={cfg.max_length} {action[cfg.overlong]}"
        f" (data.overlong: {cfg.overlong})",
        stats=stats,
    )


def untrainable(scan: Scan) -> Finding:
    """Rows whose loss mask leaves no trained token."""
    detail = "rows whose loss mask leaves no trained token once data.max_length applies"
    if scan.tokenizer is None:
        detail += "; without a tokenizer only rows whose assistant messages all have weight 0 are found"
    return _limited(
        scan,
        "untrainable",
        scan.rows,
        scan.cfg.thresholds.max_untrainable,
        "count",
        f"fix those rows ({_CLEAN})",
        detail=detail,
    )


def missing_eos(scan: Scan) -> Finding:
    """Trained rows that lose their final EOS to data.max_length (reported, no limit)."""
    tally = scan.tally["missing_eos"]
    tokenizer = scan.tokenizer
    if tokenizer is None:
        detail = f"not checked: {_NO_TOKENIZER}"
    elif tokenizer.eos_token_id is None:
        detail = "the tokenizer has no EOS token, so no row learns to stop"
    else:
        detail = f"trained rows whose final EOS is cut off by data.max_length={scan.cfg.max_length}"
    return Finding(
        "missing_eos",
        tally.count,
        scan.rows,
        None,
        None,
        fix="raise data.max_length or shorten those rows, so that the model learns where answers end",
        checked=tokenizer is not None,
        examples=tuple(tally.examples),
        detail=detail,
    )


def _percentiles(counts: np.ndarray) -> dict[str, float]:
    """p50/p90/p99 (nearest rank), max and mean of lengths given as rows per length."""
    total = int(counts.sum())
    if not total:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0}
    cumulative = np.cumsum(counts)
    rank = {q: int(np.searchsorted(cumulative, math.ceil(q / 100 * total))) for q in (50, 90, 99)}
    mean = float((np.arange(len(counts)) * counts).sum() / total)
    return {"p50": rank[50], "p90": rank[90], "p99": rank[99], "max": int(np.flatnonzero(counts)[-1]), "mean": mean}
