"""Hash-based, stratified, reproducible splits and samples."""

from __future__ import annotations

from collections import Counter

import pytest

from tunesmith.data.records import Example
from tunesmith.data.split import sample, split_by_hash, stable_hash
from tunesmith.errors import DataError


def _data(counts: dict[str | None, int]) -> list[Example]:
    examples = []
    for label, n in counts.items():
        examples += [Example(f"{label} example {i}", label, where=f"d.jsonl:{i}") for i in range(n)]
    return examples


def test_stable_hash_is_fixed_and_in_range() -> None:
    # sha1("abc") = a9993e36 4706816a ...; its first 8 bytes over 2**64.
    assert stable_hash("abc") == 0xA9993E364706816A / 2**64
    assert stable_hash("c", salt="ab") == stable_hash("abc")
    assert stable_hash("abc", salt="x") != stable_hash("abc")
    values = [stable_hash(str(i)) for i in range(1000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert 0.4 < sum(values) / len(values) < 0.6


def test_split_is_stratified_disjoint_and_complete() -> None:
    examples = _data({"a": 100, "b": 30, "c": 7, "d": 2, "e": 1})
    first, second = split_by_hash(examples, 0.2)
    assert Counter(ex.label for ex in second) == {"a": 20, "b": 6, "c": 1, "d": 1}
    assert Counter(ex.label for ex in first) == {"a": 80, "b": 24, "c": 6, "d": 1, "e": 1}
    assert sorted(map(id, first + second)) == sorted(map(id, examples))


def test_split_keeps_input_order() -> None:
    examples = _data({"a": 50, "b": 50})
    first, second = split_by_hash(examples, 0.3)
    position = {id(ex): i for i, ex in enumerate(examples)}
    for part in (first, second):
        indices = [position[id(ex)] for ex in part]
        assert indices == sorted(indices)


def test_split_is_deterministic_and_salted() -> None:
    examples = _data({"a": 60, "b": 40})
    assert split_by_hash(examples, 0.25) == split_by_hash(list(examples), 0.25)
    assert split_by_hash(examples, 0.25)[1] != split_by_hash(examples, 0.25, salt="other")[1]


def test_split_takes_the_lowest_hashes() -> None:
    examples = _data({"a": 20})
    _, second = split_by_hash(examples, 0.25)
    lowest = sorted(examples, key=lambda ex: stable_hash(ex.text + "\x00", "split"))[:5]
    assert {ex.text for ex in second} == {ex.text for ex in lowest}


def test_adding_rows_moves_few_existing_rows() -> None:
    base = _data({"a": 200})
    more = base + [Example(f"new {i}", "a") for i in range(20)]
    _, second_before = split_by_hash(base, 0.1)
    _, second_after = split_by_hash(more, 0.1)
    moved = {ex.text for ex in second_before} - {ex.text for ex in second_after}
    assert len(second_before) == 20 and len(second_after) == 22
    assert len(moved) <= 2  # only rows displaced by new lower hashes can leave


def test_unlabelled_examples_form_one_group() -> None:
    first, second = split_by_hash(_data({None: 10}), 0.3)
    assert (len(first), len(second)) == (7, 3)


def test_zero_fraction_and_bad_fraction() -> None:
    examples = _data({"a": 5, "b": 5})
    assert split_by_hash(examples, 0.0) == (examples, [])
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(DataError, match="must be at least 0 and below 1"):
            split_by_hash(examples, bad)


def test_duplicates_stay_together() -> None:
    examples = _data({"a": 30, "b": 30})
    dup = Example("the same text", "a")
    examples += [dup] * 5
    for salt in (f"s{i}" for i in range(30)):
        first, second = split_by_hash(examples, 0.5, salt=salt)
        assert sum(ex is dup for ex in first) in (0, 5)
        assert not {ex.text for ex in first} & {ex.text for ex in second}


def test_conflicting_label_duplicates_do_not_leak() -> None:
    # "same" has the lowest hash under label a (so it is picked there) but not under label b.
    def h(text: str) -> float:
        return stable_hash(text + "\x00", "split")

    candidates = [f"t{i}" for i in range(200)]
    above = [t for t in candidates if h(t) > h("same")][:17]
    below = next(t for t in candidates if h(t) < h("same"))
    examples = [Example("same", "a"), *(Example(t, "a") for t in above[:9])]
    examples += [Example("same", "b"), Example(below, "b"), *(Example(t, "b") for t in above[9:17])]
    first, second = split_by_hash(examples, 0.1)
    assert [(ex.text, ex.label) for ex in second] == [(below, "b")]
    assert [ex.text for ex in first].count("same") == 2
    assert len(first) == len(examples) - 1


def test_text_pair_is_part_of_the_key() -> None:
    examples = [Example("premise", "a", text_pair=f"hypothesis {i}") for i in range(40)]
    _, second = split_by_hash(examples, 0.25)
    assert len(second) == 10


def test_sample_is_reproducible_ordered_and_sized() -> None:
    examples = _data({"a": 50, "b": 50})
    picked = sample(examples, 10, seed=0)
    assert len(picked) == 10
    assert picked == sample(examples, 10, seed=0)
    assert picked != sample(examples, 10, seed=1)
    position = {id(ex): i for i, ex in enumerate(examples)}
    assert [position[id(ex)] for ex in picked] == sorted(position[id(ex)] for ex in picked)
    lowest = sorted(examples, key=lambda ex: stable_hash(ex.text + "\x00", "sample-0"))[:10]
    assert {ex.text for ex in picked} == {ex.text for ex in lowest}


def test_sample_edges() -> None:
    examples = _data({"a": 5})
    assert sample(examples, 5, seed=3) == examples
    assert sample(examples, 99, seed=3) == examples
    assert sample(examples, 0, seed=3) == []
    with pytest.raises(DataError, match="must not be negative"):
        sample(examples, -1, seed=3)
