"""Rows of media data sets (images, audio) that are not table files: a folder with one sub-folder per
class, and a directory written by Hugging Face `datasets`' `save_to_disk`. Table files (JSONL, CSV,
Parquet, ...) with a media column are read by `tunesmith.data.readers` like any other."""

from __future__ import annotations

from pathlib import Path

from tunesmith.data.readers import Row
from tunesmith.errors import DataError

__all__ = ["datasets_rows", "folder_rows", "is_datasets_dir", "renamed_rows", "table_base"]


def table_base(source: str) -> Path | None:
    """The folder that relative media paths in a table file are resolved against."""
    path = Path(source)
    return path.parent if path.is_file() else None


def is_datasets_dir(path: Path) -> bool:
    """Whether `path` is a directory written by `datasets.Dataset.save_to_disk`."""
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file())


def folder_rows(root: Path, suffixes: tuple[str, ...], field: str, what: str) -> list[Row]:
    """`root/<class>/<file>` as {field: path, label: class} rows, sorted by class then file name;
    only files whose suffix is in `suffixes` count.

    Raises:
        DataError: no such file under any class folder (`what` names them: "images", "audio files").
    """
    rows = [
        Row({field: str(file), "label": folder.name}, str(file))
        for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        for file in sorted(folder.rglob("*"))
        if file.is_file() and file.suffix.lower() in suffixes
    ]
    if not rows:
        raise DataError(
            f"{root}: no {what} found; a {what} folder holds one sub-folder per class with the files "
            f"inside ({', '.join(suffixes)})"
        )
    return rows


def datasets_rows(path: Path) -> list[Row]:
    """The rows of a directory written by `datasets.Dataset.save_to_disk` (Arrow stream files)."""
    import pyarrow as pa

    files = sorted(path.glob("*.arrow"))
    if not files:
        raise DataError(f"{path}: a saved datasets directory without .arrow files; save it again with save_to_disk")
    rows: list[Row] = []
    for file in files:
        try:
            with pa.memory_map(str(file)) as source:
                table = pa.ipc.open_stream(source).read_all()
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{file}: unreadable Arrow file ({exc})") from None
        offset = len(rows)
        rows.extend(Row(record, f"{file.name} row {offset + i}") for i, record in enumerate(table.to_pylist()))
    return rows


def renamed_rows(rows: list[Row], column_map: dict[str, str] | None) -> list[Row]:
    """The rows with fields renamed by `column_map` ({name_in_source: our_name})."""
    if not column_map:
        return rows
    return [Row({column_map.get(k, k): v for k, v in r.data.items()}, r.where) for r in rows]
