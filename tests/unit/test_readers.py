"""Reading JSONL, JSON, CSV/TSV and Parquet files into rows, and every bad-file error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from tunesmith.data.readers import Row, read_rows
from tunesmith.errors import DataError

RECORDS = [
    {"text": "good film", "label": "pos"},
    {"text": "bad film", "label": "neg"},
    {"text": "fine, I guess", "label": "pos"},
]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_round_trip_with_line_numbers_and_blank_lines(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", f"{json.dumps(RECORDS[0])}\n\n  \n{json.dumps(RECORDS[1])}\n")
    rows = read_rows(path)
    assert rows == [Row(RECORDS[0], f"{path}:1"), Row(RECORDS[1], f"{path}:4")]


def test_ndjson_suffix_and_crlf_and_bom(tmp_path: Path) -> None:
    path = tmp_path / "d.NDJSON"
    path.write_bytes(b"\xef\xbb\xbf" + b"\r\n".join(json.dumps(r).encode() for r in RECORDS))
    rows = read_rows(path)
    assert [r.data for r in rows] == RECORDS
    assert rows[2].where == f"{path}:3"


def test_json_list(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.json", json.dumps(RECORDS))
    rows = read_rows(path)
    assert [r.data for r in rows] == RECORDS
    assert [r.where for r in rows] == [f"{path}[0]", f"{path}[1]", f"{path}[2]"]


def test_json_object_with_one_list(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.json", json.dumps({"version": 2, "data": RECORDS}))
    assert [r.data for r in read_rows(path)] == RECORDS


def test_json_object_with_two_lists_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.json", json.dumps({"train": RECORDS, "test": RECORDS}))
    with pytest.raises(DataError, match=r"2 list-valued keys \('train', 'test'\)"):
        read_rows(path)


def test_json_item_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.json", json.dumps([RECORDS[0], RECORDS[1], "oops"]))
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert f"{path}[2]: expected a JSON object, got str" in str(info.value)


def test_json_malformed_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.json", '[\n  {"text": "a", "label": "x"},\n  {"text": "b" "label": "y"}\n]\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert f"{path}:3: malformed JSON" in str(info.value)
    assert "Expecting ',' delimiter" in str(info.value)


def test_csv_round_trip_with_quoted_newline(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", 'text,label,note\n"two\nlines",pos,\nplain,neg,x\n')
    rows = read_rows(path)
    assert rows == [
        Row({"text": "two\nlines", "label": "pos", "note": ""}, f"{path}:2"),
        Row({"text": "plain", "label": "neg", "note": "x"}, f"{path}:4"),
    ]


def test_csv_values_are_strings_and_bom_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\r\nhello,1\r\n")
    assert [r.data for r in read_rows(path)] == [{"text": "hello", "label": "1"}]


def test_tsv_round_trip(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.tsv", "text\tlabel\na, b\tpos\n\nc\tneg\n")
    rows = read_rows(path)
    assert [r.data for r in rows] == [{"text": "a, b", "label": "pos"}, {"text": "c", "label": "neg"}]
    assert [r.where for r in rows] == [f"{path}:2", f"{path}:4"]


def test_csv_wrong_number_of_values_names_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,label\nok,pos\nnot, quoted,neg\n")
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert f"{path}:3: 3 values but the header has 2 columns" in str(info.value)


def test_csv_duplicate_header(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.csv", "text,text\na,b\n")
    with pytest.raises(DataError, match=r"d\.csv:1: duplicate column name\(s\) 'text'"):
        read_rows(path)


def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist([{"text": "a", "label": 1}, {"text": "b", "label": 0}]), path)
    rows = read_rows(path)
    assert rows == [
        Row({"text": "a", "label": 1}, f"{path} row 0"),
        Row({"text": "b", "label": 0}, f"{path} row 1"),
    ]


def test_unreadable_parquet(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.parquet", "this is not parquet")
    with pytest.raises(DataError, match=r"d\.parquet: unreadable Parquet file"):
        read_rows(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value) == f"{path}: no such file; check data.train / data.validation"


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="is a directory"):
        read_rows(tmp_path)


def test_unknown_suffix_lists_supported(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.txt", "hello\n")
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert "unknown file type '.txt'" in message
    for suffix in (".csv", ".json", ".jsonl", ".ndjson", ".parquet", ".tsv"):
        assert suffix in message


def test_jsonl_malformed_line_number_and_json_message(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a"}\n\n{"text": "b",}\n{"text": "c"}\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    message = str(info.value)
    assert message.startswith(f"{path}:3: malformed JSON")
    assert "Expecting property name enclosed in double quotes" in message


def test_jsonl_line_not_an_object(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", '{"text": "a"}\n["text", "b"]\n')
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value).startswith(f"{path}:2: a JSONL line must be a JSON object")
    assert "got list" in str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_names_the_line_of_the_first_bad_byte(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"d{suffix}"
    lines = (
        ['{"text": "a"}', '{"text": "b"}', '{"text": "caf\xe9"}']
        if suffix == ".jsonl"
        else ["text", "a", "b", "caf\xe9"]
    )
    path.write_bytes("\n".join(lines).encode("latin-1"))
    with pytest.raises(DataError) as info:
        read_rows(path)
    line = 3 if suffix == ".jsonl" else 4
    assert str(info.value).startswith(f"{path}:{line}: not valid UTF-8")
    assert "re-save the file as UTF-8" in str(info.value)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("e.jsonl", ""),
        ("e.jsonl", "\n  \n\n"),
        ("e.json", "[]"),
        ("e.json", "  \n"),
        ("e.csv", "text,label\n"),
    ],
)
def test_empty_data_set(tmp_path: Path, name: str, content: str) -> None:
    path = _write(tmp_path / name, content)
    with pytest.raises(DataError) as info:
        read_rows(path)
    assert str(info.value).startswith(f"{path}: no rows")


def test_column_map_renames_fields(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"review": "nice", "stars": 5, "id": 1}])
    rows = read_rows(path, column_map={"review": "text", "stars": "label"})
    assert rows[0].data == {"id": 1, "text": "nice", "label": 5}


def test_column_map_replaces_an_existing_field_and_can_swap(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "title", "body": "the body", "a": 1, "b": 2}])
    row = read_rows(path, column_map={"body": "text", "a": "b", "b": "a"})[0]
    assert row.data == {"text": "the body", "b": 1, "a": 2}


def test_column_map_key_in_some_rows_only_is_fine(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, {"body": "b"}])
    rows = read_rows(path, column_map={"body": "text"})
    assert [r.data for r in rows] == [{"text": "a"}, {"text": "b"}]


def test_column_map_unknown_key(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", RECORDS)
    with pytest.raises(DataError) as info:
        read_rows(path, column_map={"sentence": "text"})
    message = str(info.value)
    assert message.startswith(f"{path}: data.column_map names field(s) 'sentence'")
    assert "fields present: text, label" in message
