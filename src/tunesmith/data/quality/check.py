"""The streamed data quality gate (DESIGN §6), run before training and alone as `tunesmith data check`.

`check_rows` / `check_file` report schema errors, empty rows, exact and near duplicates (MinHash),
train/validation leakage and lengths against `max_length`, and what the task's `RowChecks` adds
(texts with conflicting labels and label balance; rows with no trained token, missing EOS and chat
role order), each against `data.thresholds`. `clean_file` writes the rows worth keeping and every
dropped row with its reason: nothing is dropped silently. Both stream: memory grows by a few
hundred bytes a row, whatever the rows' length.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from tunesmith.config import DataConfig
from tunesmith.data.load import iter_source_rows
from tunesmith.data.quality.findings import findings
from tunesmith.data.quality.report import CleanSummary, QualityReport
from tunesmith.data.quality.scan import BATCH, BATCH_CHARS, REASONS, RowChecks, Scan
from tunesmith.data.readers import Row, UnreadableRow, iter_rows
from tunesmith.errors import DataError
from tunesmith.runs import atomic_writer

__all__ = ["check_file", "check_rows", "clean_file", "dropped_path", "stream_rows"]


def stream_rows(path: str | Path, column_map: dict[str, str] | None = None) -> Iterator[Row | UnreadableRow]:
    """The records of a data file in order, each a `Row` or, where it cannot be read, an `UnreadableRow`.

    Raises:
        DataError: the file cannot be read at all (see `readers.iter_rows`).
    """
    pending: list[UnreadableRow] = []
    for row in iter_rows(path, column_map, on_error=pending.append):
        yield from pending
        pending.clear()
        yield row
    yield from pending


def check_rows(
    rows: Iterable[Row | UnreadableRow],
    cfg: DataConfig,
    checks: RowChecks,
    tokenizer: Any | None = None,
    reference: Iterable[Row | UnreadableRow] | None = None,
    source: str = "rows",
) -> QualityReport:
    """Check training rows in one streamed pass.

    Args:
        rows: the training rows (fields already renamed by `data.column_map`).
        cfg: fields, `max_length`, `overlong`, `template`, `train_on_prompt` and `thresholds`.
        checks: the task's part of the checks (how a row is read, measured and reported).
        tokenizer: the model's tokenizer; without it lengths are whitespace words and the EOS check
            is skipped.
        reference: validation/test rows, checked for leakage after the training rows.
        source: what the rows are, for the report.

    Returns:
        The report; `report.passed` is False when a limit in `cfg.thresholds` is breached.
    """
    scan = _scan(rows, cfg, checks, tokenizer, reference)
    return QualityReport(source, checks.task, scan.rows, findings(scan), _unit(tokenizer))


def check_file(
    path: str | Path,
    cfg: DataConfig,
    checks: RowChecks,
    tokenizer: Any | None = None,
    references: Sequence[str | Path] = (),
) -> QualityReport:
    """Check a training file or packaged data set (see `check_rows`); `references` are
    validation/test files (or packaged names) for leakage.

    Raises:
        DataError: a file cannot be read at all (missing, unknown type, no rows, bad CSV header).
    """
    reference = _reference_rows(references, cfg) if references else None
    return check_rows(iter_source_rows(path, cfg), cfg, checks, tokenizer, reference, source=str(path))


def dropped_path(out: str | Path) -> Path:
    """Where `clean_file` writes the dropped rows: `<out stem>.dropped.jsonl` beside `out`."""
    out = Path(out)
    return out.with_name(f"{out.stem}.dropped.jsonl")


def clean_file(
    path: str | Path,
    out: str | Path,
    cfg: DataConfig,
    checks: RowChecks,
    tokenizer: Any | None = None,
    references: Sequence[str | Path] = (),
) -> QualityReport:
    """Write the rows of `path` worth keeping to `out` (JSONL, fields as in the file) and every
    dropped row, with its reason and origin, to `dropped_path(out)`. Both files are written atomically.

    Dropped: unreadable rows and schema errors, empty rows, exact duplicates (the first copy is
    kept), near duplicates (the first of each group is kept), every row of a text with conflicting
    labels, training rows that leak into `references`, and rows with no trained token.

    Returns:
        The check of `path` (as `check_file` gives it) with `cleaned` saying what was written.

    Raises:
        DataError: `out` is not a .jsonl file or is the input itself; a file cannot be read.
    """
    path, out = Path(path), Path(out)
    if out.suffix.lower() not in (".jsonl", ".ndjson"):
        raise DataError(f"{out}: the cleaned rows are written as JSONL; name the output file .jsonl")
    if out.resolve() == path.resolve():
        raise DataError(f"{out}: would overwrite the input; write the cleaned rows to another file")
    reference = _reference_rows(references, cfg) if references else None
    scan = _scan(stream_rows(path, cfg.column_map), cfg, checks, tokenizer, reference)
    kept = _write_clean(path, out, scan)
    dropped = {reason: count for reason, count in scan.dropped().items() if reason != "kept" and count}
    summary = CleanSummary(str(out), str(dropped_path(out)), kept, dropped)
    report = QualityReport(str(path), checks.task, scan.rows, findings(scan), _unit(tokenizer))
    return replace(report, cleaned=summary)


def _scan(
    rows: Iterable[Row | UnreadableRow],
    cfg: DataConfig,
    checks: RowChecks,
    tokenizer: Any | None,
    reference: Iterable[Row | UnreadableRow] | None,
) -> Scan:
    scan = Scan(cfg, checks, tokenizer)
    for batch in _batches(rows):
        scan.add(batch)
    if reference is not None:
        for batch in _batches(reference):
            scan.add_reference(batch)
    scan.finish()
    return scan


def _batches(items: Iterable[Row | UnreadableRow]) -> Iterator[list[Row | UnreadableRow]]:
    """Up to BATCH rows at a time, fewer when their texts pass BATCH_CHARS characters: what a
    batch holds while it is checked stays bounded however long the rows are."""
    batch: list[Row | UnreadableRow] = []
    chars = 0
    for item in items:
        batch.append(item)
        chars += _chars(item)
        if len(batch) >= BATCH or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _chars(item: Row | UnreadableRow) -> int:
    """Characters of a row's texts: its string fields and the content of its messages."""
    if isinstance(item, UnreadableRow):
        return len(item.raw)
    total = 0
    for value in item.data.values():
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(m.get("content") or "") for m in value if isinstance(m, dict))
    return total


def _reference_rows(paths: Sequence[str | Path], cfg: DataConfig) -> Iterator[Row | UnreadableRow]:
    for path in paths:
        yield from iter_source_rows(path, cfg)


def _unit(tokenizer: Any | None) -> Literal["tokens", "words"]:
    return "tokens" if tokenizer is not None else "words"


def _write_clean(path: Path, out: Path, scan: Scan) -> int:
    """Second pass over `path`: each row to `out` or, with its reason, to the dropped file."""
    kept = index = 0
    with atomic_writer(out) as kept_file, atomic_writer(dropped_path(out)) as dropped_file:
        # Fields as in the file (no column_map), so the cleaned file reads like the original.
        for index, item in enumerate(stream_rows(path), start=1):
            if index > scan.rows:
                break
            reason = REASONS[int(scan.reasons.data[index - 1])]
            if reason == "kept" and isinstance(item, Row):
                kept_file.write(json.dumps(item.data, ensure_ascii=False) + "\n")
                kept += 1
                continue
            record: dict[str, Any] = {"where": item.where, "reason": reason}
            if isinstance(item, UnreadableRow):
                record.update(detail=item.problem, raw=item.raw)
            else:
                problem = _problem(item, scan) if reason in ("schema_error", "empty") else ""
                record.update(detail=scan.detail(index - 1, problem), row=item.data)
            dropped_file.write(json.dumps(record, ensure_ascii=False) + "\n")
        if index != scan.rows:  # the file changed between the two passes: write nothing
            raise DataError(f"{path}: the file changed while it was being cleaned; run `data clean` again")
    return kept


def _problem(row: Row, scan: Scan) -> str:
    """The reading problem of a row (its fields renamed as the check saw them)."""
    column_map = scan.cfg.column_map
    data = {key: value for key, value in row.data.items() if key not in column_map}
    data.update({column_map[key]: value for key, value in row.data.items() if key in column_map})
    return scan.checks.inspect(Row(data, row.where)).problem
