"""Read data files (JSONL, JSON, CSV/TSV, Parquet) into rows that remember where they came from.

Every row carries its origin (`file:line`, `file[index]` or `file row N`) so that later checks can
point a user at the exact place to fix. Bad files raise `DataError` naming the file, the line and the fix.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import DataError

__all__ = ["SUPPORTED_SUFFIXES", "Row", "UnreadableRow", "iter_rows", "read_rows"]


@dataclass(frozen=True)
class Row:
    """One record of a data file.

    Attributes:
        data: the record's fields, after `column_map` renaming.
        where: its origin: `file.jsonl:12` / `file.csv:12` (1-based physical line),
            `file.json[3]` (0-based array index) or `file.parquet row 5` (0-based row).
    """

    data: dict[str, Any]
    where: str


@dataclass(frozen=True)
class UnreadableRow:
    """A record `iter_rows` could not parse: its origin (`file.jsonl:12`), what is wrong and the
    fix, and its text as in the file (bytes that are not UTF-8 replaced)."""

    where: str
    problem: str
    raw: str


def read_rows(path: str | Path, column_map: Mapping[str, str] | None = None) -> list[Row]:
    """Read every record of a data file; the format is chosen by the file's suffix.

    Formats: JSONL (`.jsonl`, `.ndjson`; blank lines skipped), JSON (`.json`: a list of objects,
    or an object holding one list of objects such as `{"data": [...]}`), CSV (`.csv`) and TSV
    (`.tsv`) with a header row (all values are strings), Parquet (`.parquet`).

    Args:
        path: the data file.
        column_map: renames fields, `{name_in_file: our_name}`. A renamed field replaces a field
            that already has `our_name`.

    Returns:
        The rows in file order (at least one).

    Raises:
        DataError: the file is missing, unreadable, malformed, not UTF-8, empty, or a
            `column_map` key occurs in no row.
    """
    path = _existing_file(path)
    rows = _reader_for(path)(path)
    if not rows:
        raise DataError(f"{path}: no rows (the data set is empty); add examples or check the path")
    return _rename(rows, column_map, path) if column_map else rows


def iter_rows(
    path: str | Path,
    column_map: Mapping[str, str] | None = None,
    on_error: Callable[[UnreadableRow], None] | None = None,
) -> Iterator[Row]:
    """Stream the rows `read_rows` gives, one at a time: JSONL line by line, CSV/TSV record by
    record (JSON and Parquet are read whole, then yielded).

    Args:
        on_error: called with each record that cannot be read (malformed JSON, a JSONL line that is
            not an object or not UTF-8, a CSV record with the wrong number of values), then reading
            goes on. None raises `DataError` at the first one, as `read_rows` does.

    Raises:
        DataError: as `read_rows`; a file with no rows or a `column_map` key no row has is found
            after the last row.
    """
    path = _existing_file(path)
    _reader_for(path)  # an unknown suffix fails before anything is read
    unreadable = 0

    def report(bad: UnreadableRow) -> None:
        nonlocal unreadable
        unreadable += 1
        (on_error or _raise_unreadable)(bad)

    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        rows: Iterable[Row] = _stream_jsonl(path, report)
    elif suffix in (".csv", ".tsv"):
        rows = _stream_delimited(path, "," if suffix == ".csv" else "\t", report)
    else:
        rows = read_rows(path)
    count, unseen = 0, set(column_map or {})
    for row in rows:
        count += 1
        if column_map:
            unseen.difference_update([name for name in unseen if name in row.data])
            row = Row(_renamed(row.data, column_map), row.where)
        yield row
    if not count and not unreadable:
        raise DataError(f"{path}: no rows (the data set is empty); add examples or check the path")
    if count and unseen:
        missing = ", ".join(repr(name) for name in column_map or {} if name in unseen)
        raise DataError(f"{path}: data.column_map names field(s) {missing} that no row has; fix data.column_map")


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file; check data.train / data.validation")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, not a data file; give a file ({_supported()})")
    return path


def _raise_unreadable(bad: UnreadableRow) -> None:
    raise DataError(f"{bad.where}: {bad.problem}")


def _stream_jsonl(path: Path, report: Callable[[UnreadableRow], None]) -> Iterator[Row]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8) :]
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problem = f"not valid UTF-8 (byte 0x{raw[e.start]:02x}); re-save the file as UTF-8"
                report(UnreadableRow(where, problem, raw.decode("utf-8", "replace").rstrip("\r\n")))
                continue
            if not line.strip():
                continue
            problem, record = _jsonl_record(line)
            if problem:
                report(UnreadableRow(where, problem, line.rstrip("\r\n")))
                continue
            yield Row(record, where)


def _jsonl_record(line: str) -> tuple[str, dict[str, Any]]:
    """The object on a JSONL line, or a problem (and an empty record) when it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return f"malformed JSON ({e.msg} at column {e.colno}); fix the syntax of this line", {}
    if not isinstance(record, dict):
        return (
            f'a JSONL line must be a JSON object like {{"text": ..., "label": ...}}, got '
            f"{type(record).__name__}; put one object on each line"
        ), {}
    return "", record


def _stream_delimited(path: Path, delimiter: str, report: Callable[[UnreadableRow], None]) -> Iterator[Row]:
    bad_lines: dict[int, int] = {}  # physical line -> its first byte that is not UTF-8
    with path.open("rb") as fh:
        reader = csv.reader(_decoded_lines(fh, bad_lines), delimiter=delimiter)
        header: list[str] | None = None
        last_line = 0
        while True:
            start = last_line + 1
            try:
                values = next(reader, None)
            except csv.Error as e:
                raise DataError(
                    f"{path}:{reader.line_num}: cannot parse this line ({e}); check its quotes and delimiters"
                ) from e
            last_line = reader.line_num
            if values is None:
                break
            if not values:  # a blank line
                continue
            if header is None:
                _check_utf8(bad_lines, path)
                header = _check_header(values, path, start)
                continue
            problem = _delimited_problem(values, header, bad_lines, start, last_line)
            if problem:
                report(UnreadableRow(f"{path}:{start}", problem, delimiter.join(values)))
                continue
            yield Row(dict(zip(header, values, strict=True)), f"{path}:{start}")


def _decoded_lines(lines: Iterable[bytes], bad_lines: dict[int, int]) -> Iterator[str]:
    """Each line decoded as UTF-8 (a leading byte-order mark dropped); lines that are not UTF-8
    go into `bad_lines` with their first bad byte, and their bad bytes become U+FFFD."""
    for number, raw in enumerate(lines, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            bad_lines[number] = raw[e.start]
            yield raw.decode("utf-8", "replace")


def _check_utf8(bad_lines: dict[int, int], path: Path) -> None:
    if bad_lines:
        line, byte = next(iter(bad_lines.items()))
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{byte:02x}); re-save the file as UTF-8")


def _delimited_problem(values: list[str], header: list[str], bad_lines: dict[int, int], first: int, last: int) -> str:
    bad = [line for line in bad_lines if first <= line <= last]
    if bad:
        at = "" if bad[0] == first else f"line {bad[0]} is "  # a quoted value can span lines
        return f"{at}not valid UTF-8 (byte 0x{bad_lines[bad[0]]:02x}); re-save the file as UTF-8"
    if len(values) != len(header):
        return (
            f"{len(values)} values but the header has {len(header)} columns; "
            "quote values that contain the delimiter or fix the row"
        )
    return ""


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        problem, record = _jsonl_record(line)
        if problem:
            raise DataError(f"{path}:{number}: {problem}")
        rows.append(Row(record, f"{path}:{number}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = _read_text(path)
    if not text.strip():
        return []
    records = _records_of(_parse_json(text, line_offset=0, path=path), path)
    rows = []
    for index, record in enumerate(records):
        where = f"{path}[{index}]"
        if not isinstance(record, dict):
            raise DataError(
                f"{where}: expected a JSON object, got {type(record).__name__}; "
                "make every item of the list an object with named fields"
            )
        rows.append(Row(record, where))
    return rows


def _records_of(document: Any, path: Path) -> list[Any]:
    """The list of records in a JSON document: the document itself, or its one list-valued key."""
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        lists = [key for key, value in document.items() if isinstance(value, list)]
        if len(lists) == 1:
            return list(document[lists[0]])
        found = (
            f"it has {len(lists)} list-valued keys ({', '.join(map(repr, lists))})"
            if lists
            else "it has no list-valued key"
        )
        raise DataError(
            f"{path}: a JSON object must hold exactly one list of records, but {found}; "
            'use a list of objects, or an object like {"data": [...]}'
        )
    raise DataError(
        f"{path}: expected a list of objects, got {type(document).__name__}; "
        'use a list of objects, or an object like {"data": [...]}'
    )


def _parse_json(text: str, line_offset: int, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{line_offset + e.lineno}: malformed JSON ({e.msg} at column {e.colno}); "
            "fix the syntax of this line"
        ) from e


def _read_csv(path: Path) -> list[Row]:
    return _read_delimited(path, delimiter=",")


def _read_tsv(path: Path) -> list[Row]:
    return _read_delimited(path, delimiter="\t")


def _read_delimited(path: Path, delimiter: str) -> list[Row]:
    """Every row of a CSV/TSV file; the first unreadable one raises (the streaming reader, held)."""
    return list(_stream_delimited(path, delimiter, _raise_unreadable))


def _check_header(names: list[str], path: Path, line: int) -> list[str]:
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DataError(
            f"{path}:{line}: duplicate column name(s) {', '.join(map(repr, duplicates))} in the "
            "header; give every column a distinct name"
        )
    return names


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow as pa  # lazily: importing pyarrow is slow and only Parquet needs it
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: unreadable Parquet file ({e}); re-save it as Parquet or use JSONL/CSV") from e
    return [Row(record, f"{path} row {index}") for index, record in enumerate(records)]


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark is dropped)."""
    data = path.read_bytes()
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{data[e.start]:02x}); re-save the file as UTF-8"
        ) from e


def _rename(rows: list[Row], column_map: Mapping[str, str], path: Path) -> list[Row]:
    present: dict[str, None] = {}
    for row in rows:
        present.update(dict.fromkeys(row.data))
    missing = [name for name in column_map if name not in present]
    if missing:
        raise DataError(
            f"{path}: data.column_map names field(s) {', '.join(map(repr, missing))} that no row "
            f"has (fields present: {_names(present)}); fix data.column_map"
        )
    return [Row(_renamed(row.data, column_map), row.where) for row in rows]


def _renamed(data: dict[str, Any], column_map: Mapping[str, str]) -> dict[str, Any]:
    out = {key: value for key, value in data.items() if key not in column_map}
    out.update({column_map[key]: value for key, value in data.items() if key in column_map})
    return out


def _names(fields: Mapping[str, Any], limit: int = 20) -> str:
    names = list(fields)
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


_READERS: dict[str, Callable[[Path], list[Row]]] = {
    ".jsonl": _read_jsonl,
    ".ndjson": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
    ".tsv": _read_tsv,
    ".parquet": _read_parquet,
}
SUPPORTED_SUFFIXES: tuple[str, ...] = tuple(sorted(_READERS))


def _supported() -> str:
    return ", ".join(SUPPORTED_SUFFIXES)


def _reader_for(path: Path) -> Callable[[Path], list[Row]]:
    suffix = path.suffix.lower()
    if suffix not in _READERS:
        kind = f"'{suffix}'" if suffix else "(no suffix)"
        raise DataError(
            f"{path}: unknown file type {kind}; supported: {_supported()} (the format is chosen by the file's suffix)"
        )
    return _READERS[suffix]
