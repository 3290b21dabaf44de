"""Rows to examples (field checks, label conversion), label resolution and known-label checks."""

from __future__ import annotations

from typing import Any

import pytest

from tunesmith.data.readers import Row
from tunesmith.data.records import Example, check_known_labels, resolve_labels, to_examples
from tunesmith.errors import DataError


def _rows(*records: dict[str, Any]) -> list[Row]:
    return [Row(dict(r), f"d.jsonl:{i}") for i, r in enumerate(records, start=1)]


def _examples(*labels: str | None) -> list[Example]:
    return [Example(f"text {i}", label, where=f"d.jsonl:{i}") for i, label in enumerate(labels, start=1)]


def test_to_examples_basic() -> None:
    rows = _rows({"text": "good", "label": "pos", "x": 1}, {"text": "bad", "label": "neg"})
    assert to_examples(rows, "text", "label") == [
        Example("good", "pos", None, "d.jsonl:1"),
        Example("bad", "neg", None, "d.jsonl:2"),
    ]


def test_text_pair_and_custom_fields() -> None:
    rows = _rows({"premise": "a cat", "hypothesis": "an animal", "gold": "entail"})
    (ex,) = to_examples(rows, "premise", "gold", text_pair_field="hypothesis")
    assert (ex.text, ex.text_pair, ex.label) == ("a cat", "an animal", "entail")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("pos", "pos"),
        ("  pos ", "pos"),
        (1, "1"),
        (0, "0"),
        (-2, "-2"),
        (True, "true"),
        (False, "false"),
        (1.0, "1"),
        (3.0, "3"),
    ],
)
def test_label_conversion(value: Any, expected: str) -> None:
    (ex,) = to_examples(_rows({"text": "t", "label": value}), "text", "label")
    assert ex.label == expected


@pytest.mark.parametrize("value", [0.5, float("inf"), [1], {"a": 1}])
def test_bad_label_values(value: Any) -> None:
    with pytest.raises(DataError) as info:
        to_examples(_rows({"text": "t", "label": "x"}, {"text": "t", "label": value}), "text", "label")
    assert "d.jsonl:2: label" in str(info.value)
    assert "not a string or whole number" in str(info.value)


@pytest.mark.parametrize(("value", "kind"), [(None, "null"), (float("nan"), "null"), ("  ", "empty")])
def test_blank_label_when_required(value: Any, kind: str) -> None:
    with pytest.raises(DataError, match=rf"d\.jsonl:1: {kind} label in field 'label'"):
        to_examples(_rows({"text": "t", "label": value}), "text", "label")


def test_label_map_after_conversion() -> None:
    rows = _rows({"text": "a", "label": 1}, {"text": "b", "label": 0}, {"text": "c", "label": "other"})
    examples = to_examples(rows, "text", "label", label_map={"1": "positive", "0": "negative"})
    assert [ex.label for ex in examples] == ["positive", "negative", "other"]


def test_missing_text_field_names_fields_present() -> None:
    with pytest.raises(DataError) as info:
        to_examples(_rows({"text": "ok", "label": "a"}, {"sentence": "x", "label": "b"}), "text", "label")
    assert (
        "d.jsonl:2: missing field 'text' (fields present: sentence, label); set data.text_field or data.column_map"
    ) in str(info.value)


def test_missing_label_and_pair() -> None:
    with pytest.raises(DataError) as info:
        to_examples(_rows({"text": "ok"}), "text", "label", text_pair_field="pair")
    message = str(info.value)
    assert "d.jsonl:1: missing field 'pair'" in message
    assert "d.jsonl:1: missing field 'label' (fields present: text); set data.label_field" in message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty text"),
        (" \n\t", "empty text"),
        (42, "must be a string, got int"),
        (["a"], "must be a string, got list"),
        (None, "is null"),
    ],
)
def test_bad_text(text: Any, problem: str) -> None:
    with pytest.raises(DataError) as info:
        to_examples(_rows({"text": "fine", "label": "a"}, {"text": text, "label": "a"}), "text", "label")
    assert "d.jsonl:2: " in str(info.value)
    assert problem in str(info.value)
    assert "d.jsonl:1" not in str(info.value)


def test_unlabelled_input_when_labels_not_required() -> None:
    rows = _rows({"text": "a"}, {"text": "b", "label": None}, {"text": "c", "label": ""}, {"text": "d", "label": 2})
    examples = to_examples(rows, "text", "label", require_labels=False)
    assert [ex.label for ex in examples] == [None, None, None, "2"]


def test_no_label_field() -> None:
    (ex,) = to_examples(_rows({"text": "a", "label": "x"}), "text", None, require_labels=False)
    assert ex.label is None
    with pytest.raises(DataError, match=r"set data\.label_field"):
        to_examples(_rows({"text": "a"}), "text", None)


def test_all_errors_collected_and_capped() -> None:
    rows = _rows(*[{"text": "", "label": "a"} for _ in range(25)], {"text": "ok", "label": "a"})
    with pytest.raises(DataError) as info:
        to_examples(rows, "text", "label")
    lines = str(info.value).splitlines()
    assert lines[0].startswith("25 problem(s) in the data")
    assert lines[1].strip().startswith("d.jsonl:1: empty text")
    assert lines[20].strip().startswith("d.jsonl:20: empty text")
    assert lines[21].strip() == "... and 5 more"
    assert len(lines) == 22


def test_several_problems_in_one_row_are_all_reported() -> None:
    with pytest.raises(DataError) as info:
        to_examples(_rows({"text": 3, "label": 0.5}), "text", "label")
    assert str(info.value).startswith("2 problem(s)")


def test_resolve_labels_sorted_by_default() -> None:
    assert resolve_labels(_examples("neg", "pos", "neg", "mixed")) == ["mixed", "neg", "pos"]


def test_resolve_labels_configured_order_kept() -> None:
    assert resolve_labels(_examples("neg", "pos"), ["pos", "neg", "neutral"]) == ["pos", "neg", "neutral"]


def test_resolve_labels_unknown_configured_label_names_a_line() -> None:
    with pytest.raises(DataError) as info:
        resolve_labels(_examples("neg", "pos", "meh", "meh"), ["pos", "neg"])
    message = str(info.value)
    assert "'meh' (e.g. d.jsonl:3)" in message
    assert "'pos'" not in message.split("data.labels is")[0]


def test_resolve_labels_one_class() -> None:
    with pytest.raises(DataError) as info:
        resolve_labels(_examples("x", "x"))
    assert str(info.value) == "only one class 'x' in the training data; classification needs at least two"


def test_resolve_labels_other_errors() -> None:
    with pytest.raises(DataError, match="no training examples"):
        resolve_labels([])
    with pytest.raises(DataError, match=r"d\.jsonl:2: training example without a label"):
        resolve_labels(_examples("a", None, "b"))
    with pytest.raises(DataError, match="'a' more than once"):
        resolve_labels(_examples("a", "b"), ["a", "b", "a"])


def test_check_known_labels() -> None:
    check_known_labels(_examples("a", "b", None), ["a", "b"], "data.validation")
    with pytest.raises(DataError) as info:
        check_known_labels(_examples("a", "c", "d", "c"), ["a", "b"], "data.validation")
    message = str(info.value)
    assert message.startswith(
        "data.validation: label(s) not seen in training: 'c' (e.g. d.jsonl:2), 'd' (e.g. d.jsonl:3)"
    )
    assert "known labels: a, b" in message
    assert "must be seen in training" in message
