"""Evidence: `data check` on a deliberately dirtied copy of the packaged reviews finds every
injected problem, with counts equal to what was injected."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import check_task_file, clean_task_file, write_jsonl
from tunesmith.config import DataConfig
from tunesmith.zoo import packaged_data_rows

pytestmark = pytest.mark.slow

K = 20  # copies of each injected problem
# A one-word edit of a 10-30-word review has a shingle Jaccard of about 0.8-0.9: the default 0.8
# would sit on the edge of what was injected, so the check runs at 0.7 (data.thresholds).
CONFIG = {"thresholds": {"near_duplicate_jaccard": 0.7}}
FLIP = {"positive": "negative", "negative": "positive"}


def _one_word_changed(text: str) -> str:
    words = text.split()
    words[len(words) // 2] = "xylophone"
    return " ".join(words)


def dirty_reviews(tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    """3,000 packaged reviews, cleaned first (real data has its own duplicates), then dirtied."""
    reviews = [{"text": r["text"], "label": r["label"]} for r, _ in packaged_data_rows("rotten-tomatoes")[:3000]]
    raw = write_jsonl(tmp_path / "raw.jsonl", reviews)
    clean_task_file(raw, tmp_path / "clean.jsonl", DataConfig(train=str(raw), **CONFIG), "classification")
    base = [json.loads(line) for line in (tmp_path / "clean.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    mid = [r for r in base if 10 <= len(r["text"].split()) <= 30]  # room for a one-word edit
    picks = rng.sample(range(len(mid)), 5 * K)
    groups = [[mid[i] for i in picks[j * K : (j + 1) * K]] for j in range(5)]
    train = list(base)
    train += [{**r, "text": "  " + r["text"].upper() + " "} for r in groups[0]]  # exact (case, spaces)
    train += [{**r, "text": _one_word_changed(r["text"])} for r in groups[1]]  # near duplicates
    train += [{**r, "label": FLIP[r["label"]]} for r in groups[2]]  # same text, other label
    train += [{"text": " \n ", "label": "positive"} for _ in range(K)]  # empty
    validation = [*groups[3], *({**r, "text": _one_word_changed(r["text"])} for r in groups[4])]  # leaks
    rng.shuffle(train)
    injected = {"duplicates": K, "near_duplicates": K, "conflicting": K, "empty": K, "leakage": 2 * K}
    return (
        write_jsonl(tmp_path / "dirty.jsonl", train),
        write_jsonl(tmp_path / "validation.jsonl", validation),
        injected,
    )


def test_every_injected_problem_in_the_reviews_is_found(tmp_path: Path) -> None:
    train, validation, injected = dirty_reviews(tmp_path)
    report = check_task_file(train, DataConfig(train=str(train), **CONFIG), "classification", None, [validation])
    counts = {f.name: f.count for f in report.findings if f.name in injected}
    assert counts == injected
    assert report.finding("schema_errors").count == 0
    assert not report.passed
