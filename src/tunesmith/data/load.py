"""From `data:` config to examples: read files (or packaged data), split off validation, sample."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tunesmith.config import DataConfig
from tunesmith.data.audio import AudioExample, read_audio_table, to_audio_examples
from tunesmith.data.images import ImageExample, read_image_table, to_image_examples
from tunesmith.data.media import table_base
from tunesmith.data.mix import few_shot, replay_rows
from tunesmith.data.preferences import PreferenceExample, to_preference_examples
from tunesmith.data.readers import Row, UnreadableRow, iter_rows, read_rows
from tunesmith.data.records import Example, check_known_labels, resolve_labels, to_examples
from tunesmith.data.sft import SftExample, to_sft_examples
from tunesmith.data.split import sample, split_by_hash
from tunesmith.runs import file_sha256
from tunesmith.zoo import PACKAGED_DATA, packaged_data_rows

_NAMED = 3  # unreadable examples named on the console (the report lists all)

__all__ = [
    "Splits",
    "iter_source_rows",
    "load_splits",
    "read_audio_examples",
    "read_examples",
    "read_image_examples",
    "read_preference_examples",
    "read_sft_examples",
    "read_source_rows",
    "source_hash",
    "without_unreadable",
]


@dataclass
class Splits:
    train: list[Any]  # the task's examples (Example, SftExample, ImageExample, PreferenceExample)
    validation: list[Any] | None
    test: list[Any] | None
    labels: list[str]  # empty for tasks without a label set
    # source name -> content hash (sha256 of the file, or the packaged carrier's file)
    hashes: dict[str, str] = field(default_factory=dict)
    replayed: int = 0  # rows of data.replay appended to train


def read_examples(source: str, cfg: DataConfig, require_labels: bool = True) -> list[Example]:
    """Examples from a data file or a packaged data set name (e.g. rotten-tomatoes)."""
    rows = _rows(source, cfg)
    return to_examples(rows, cfg.text_field, cfg.label_field, cfg.text_pair_field, cfg.label_map, require_labels)


def read_image_examples(source: str, cfg: DataConfig, require_labels: bool = True) -> list[ImageExample]:
    """Image examples from a folder, a table with an image column, arrays, or packaged data (mnist-5k)."""
    rows = _rows(source, cfg, images=True)
    base = table_base(source) if source not in PACKAGED_DATA or Path(source).exists() else None
    return to_image_examples(rows, cfg.image_field, cfg.label_field, base, cfg.label_map, require_labels)


def read_audio_examples(source: str, cfg: DataConfig, target: str | None, require: bool = True) -> list[AudioExample]:
    """Speech examples from a class folder, a table with an audio column or a saved `datasets` directory.

    Args:
        target: "label" (audio-classification), "text" (transcription: the transcript in
            `data.text_field`) or None (audio alone).
        require: whether each row must have its target (False for rows to predict on).
    """
    rows = read_audio_table(source, cfg.column_map)
    label_field = cfg.label_field if target == "label" else None
    text_field = cfg.text_field if target == "text" else None
    return to_audio_examples(rows, cfg.audio_field, label_field, text_field, table_base(source), cfg.label_map, require)


def read_preference_examples(source: str, cfg: DataConfig) -> list[PreferenceExample]:
    """Preference pairs ({prompt, chosen, rejected} or OpenAI DPO rows)."""
    return to_preference_examples(_rows(source, cfg))


def read_sft_examples(source: str, cfg: DataConfig, require_completion: bool = True) -> list[SftExample]:
    """Instruction-tuning rows (prompt/completion, Alpaca, chat messages or plain text)."""
    return to_sft_examples(_rows(source, cfg), require_completion)


def load_splits(cfg: DataConfig, seed: int, read: Callable[[str], list[Any]], labelled: bool) -> Splits:
    """Train / validation / test examples and the label order (`labelled` tasks: every label checked).

    Args:
        read: the task's reader, from a data source to its examples.
        labelled: whether examples carry labels of a label set to resolve and check.
    """
    train = read(cfg.train)
    validation: list[Any] | None = None
    if isinstance(cfg.validation, float):
        train, validation = split_by_hash(train, cfg.validation)
    elif isinstance(cfg.validation, str):
        validation = read(cfg.validation)
    if cfg.limit is not None:
        train = sample(train, cfg.limit, seed)
    if cfg.few_shot is not None:
        train = few_shot(train, cfg.few_shot, seed)
    test = read(cfg.test) if cfg.test else None
    replay = read(cfg.replay.path) if cfg.replay else []
    sources = [s for s in (cfg.train, cfg.validation, cfg.test) if isinstance(s, str)]
    sources += [cfg.replay.path] if cfg.replay else []
    hashes = {s: source_hash(s) for s in sources}
    mixed = replay_rows(replay, len(train), cfg.replay.fraction, seed) if cfg.replay else []
    if not labelled:
        return Splits(train + mixed, validation, test, [], hashes, len(mixed))
    labels = resolve_labels(train, cfg.labels)
    if mixed:
        check_known_labels(mixed, labels, "data.replay")
    if validation is not None:
        check_known_labels(validation, labels, "validation")
    if test is not None:
        check_known_labels(test, labels, "test")
    return Splits(train + mixed, validation, test, labels, hashes, len(mixed))


def without_unreadable(splits: Splits, unreadable: Sequence[str]) -> Splits:
    """The splits without the examples (by origin) the quality gate could not read; it has named each
    one in its report. Says on stderr how many were skipped, and names the first few."""
    bad = set(unreadable)
    if not bad:
        return splits

    def keep(rows: list[Any] | None) -> list[Any] | None:
        return None if rows is None else [r for r in rows if r.where not in bad]

    shown = ", ".join(list(unreadable)[:_NAMED])
    more = f" and {len(bad) - _NAMED} more" if len(bad) > _NAMED else ""
    print(
        f"skipping {len(bad)} unreadable example(s): {shown}{more} (all are listed in the run's data_report.json)",
        file=sys.stderr,
    )
    return replace(splits, train=keep(splits.train) or [], validation=keep(splits.validation), test=keep(splits.test))


def read_source_rows(source: str, cfg: DataConfig) -> list[Row]:
    """The raw rows of a data file or packaged data set (column_map applied)."""
    return _rows(source, cfg)


def iter_source_rows(source: str | Path, cfg: DataConfig) -> Iterator[Row | UnreadableRow]:
    """The records of a data file (streamed, `column_map` applied) or of a packaged data set, in order:
    each a `Row` or, where it cannot be read, an `UnreadableRow` (for the data gate, which reports them).

    Raises:
        DataError: the file cannot be read at all (see `readers.iter_rows`).
    """
    if str(source) in PACKAGED_DATA and not Path(source).exists():
        yield from _rows(str(source), cfg)
        return
    pending: list[UnreadableRow] = []
    for row in iter_rows(source, cfg.column_map, on_error=pending.append):
        yield from pending
        pending.clear()
        yield row
    yield from pending


def source_hash(source: str) -> str:
    """sha256 of a data file (or a packaged set's file); of an image folder, over its files' names and bytes."""
    if source in PACKAGED_DATA and not Path(source).exists():
        from tunesmith.zoo import carrier_path

        return file_sha256(carrier_path(PACKAGED_DATA[source]))
    if Path(source).is_dir():
        return _folder_hash(Path(source))
    return file_sha256(source)


def _folder_hash(root: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + b"\x00" + file_sha256(file).encode())
    return digest.hexdigest()


def _rows(source: str, cfg: DataConfig, images: bool = False) -> list[Row]:
    if source in PACKAGED_DATA and not Path(source).exists():
        rows = [Row(data=data, where=where) for data, where in packaged_data_rows(source)]
        if cfg.column_map:
            rows = [Row({cfg.column_map.get(k, k): v for k, v in r.data.items()}, r.where) for r in rows]
        return rows
    if images:
        return read_image_table(source, cfg.column_map)
    return read_rows(source, cfg.column_map)
