"""From `data:` config to examples: read files (or packaged data), split off validation, sample."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config import DataConfig
from tunesmith.data.images import ImageExample, read_image_table, table_base, to_image_examples
from tunesmith.data.mix import few_shot, replay_rows
from tunesmith.data.preferences import to_preference_examples
from tunesmith.data.readers import Row, read_rows
from tunesmith.data.records import Example, check_known_labels, resolve_labels, to_examples
from tunesmith.data.sft import SftExample, to_sft_examples
from tunesmith.data.split import sample, split_by_hash
from tunesmith.runs import file_sha256
from tunesmith.zoo import PACKAGED_DATA, packaged_data_rows

__all__ = [
    "Splits",
    "load_splits",
    "read_examples",
    "read_image_examples",
    "read_sft_examples",
    "read_source_rows",
    "read_task_examples",
    "source_hash",
]


@dataclass
class Splits:
    train: list[Any]  # Example (classification) or SftExample (sft)
    validation: list[Any] | None
    test: list[Any] | None
    labels: list[str]  # empty for sft
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


def read_task_examples(source: str, cfg: DataConfig, task: str) -> list[Any]:
    """Examples of `task` from a data file or packaged data name."""
    if task == "sft":
        return read_sft_examples(source, cfg)
    if task == "image-classification":
        return read_image_examples(source, cfg)
    if task in ("reward", "dpo"):
        return to_preference_examples(_rows(source, cfg))
    if task == "rl":  # prompts; a completion, if present, is not used
        return read_sft_examples(source, cfg, require_completion=False)
    return read_examples(source, cfg)


def read_sft_examples(source: str, cfg: DataConfig, require_completion: bool = True) -> list[SftExample]:
    """Instruction-tuning rows (prompt/completion, Alpaca, chat messages or plain text)."""
    return to_sft_examples(_rows(source, cfg), require_completion)


def load_splits(cfg: DataConfig, seed: int, task: str = "classification") -> Splits:
    """Train / validation / test examples and the label order, every label checked."""

    def read(source: str, cfg: DataConfig) -> list[Any]:
        return read_task_examples(source, cfg, task)

    train = read(cfg.train, cfg)
    validation: list[Any] | None = None
    if isinstance(cfg.validation, float):
        train, validation = split_by_hash(train, cfg.validation)
    elif isinstance(cfg.validation, str):
        validation = read(cfg.validation, cfg)
    if cfg.limit is not None:
        train = sample(train, cfg.limit, seed)
    if cfg.few_shot is not None:
        train = few_shot(train, cfg.few_shot, seed)
    test = read(cfg.test, cfg) if cfg.test else None
    replay = read(cfg.replay.path, cfg) if cfg.replay else []
    sources = [s for s in (cfg.train, cfg.validation, cfg.test) if isinstance(s, str)]
    sources += [cfg.replay.path] if cfg.replay else []
    hashes = {s: source_hash(s) for s in sources}
    mixed = replay_rows(replay, len(train), cfg.replay.fraction, seed) if cfg.replay else []
    if task in ("sft", "reward", "dpo", "rl"):  # no labels: instruction rows, preference pairs, prompts
        return Splits(train + mixed, validation, test, [], hashes, len(mixed))
    labels = resolve_labels(train, cfg.labels)
    if mixed:
        check_known_labels(mixed, labels, "data.replay")
    if validation is not None:
        check_known_labels(validation, labels, "validation")
    if test is not None:
        check_known_labels(test, labels, "test")
    return Splits(train + mixed, validation, test, labels, hashes, len(mixed))


def read_source_rows(source: str, cfg: DataConfig) -> list[Row]:
    """The raw rows of a data file or packaged data set (column_map applied)."""
    return _rows(source, cfg)


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
