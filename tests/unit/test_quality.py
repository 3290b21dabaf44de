"""The data quality gate: known problems injected into clean data are each found exactly, through the
Python API and the CLI; `data clean` drops them with their reasons and keeps everything else."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from conftest import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    check_task_file,
    check_task_rows,
    clean_task_file,
    make_tiny_byte_tokenizer,
    run_cli,
    write_jsonl,
)
from tunesmith.config import DataConfig, QualityThresholds
from tunesmith.data.quality import dropped_path, gate, stream_rows
from tunesmith.data.quality.keyindex import KeyIndex
from tunesmith.data.quality.minhash import estimate_jaccard, signatures
from tunesmith.data.quality.render import report_html
from tunesmith.data.readers import Row, UnreadableRow, iter_rows, read_rows
from tunesmith.errors import DataError

K = 3  # copies of each injected problem
WORDS = [*POSITIVE, *NEGATIVE, *FILLER, *(f"topic{i}" for i in range(40))]


def clean_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Distinct 12-word reviews: a sentiment word, 10 other words and a unique id word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        others = rng.sample([w for w in WORDS if w not in POSITIVE + NEGATIVE], 10)
        words = [*others, word, f"id{i}"]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def one_word_changed(text: str) -> str:
    """The same text with its first word replaced by a word it does not contain."""
    words = text.split()
    words[0] = "zebra"
    return " ".join(words)


@pytest.fixture()
def injected(tmp_path: Path) -> dict[str, Any]:
    """A training file with K of each problem, and a validation file with K exact + K near leaks."""
    base = clean_rows(60)
    lines = [json.dumps(row) for row in base]
    lines += [json.dumps({**base[i], "text": base[i]["text"].upper()}) for i in range(K)]  # duplicates (case)
    lines += [json.dumps({**base[10 + i], "text": one_word_changed(base[10 + i]["text"])}) for i in range(K)]
    flipped = {"positive": "negative", "negative": "positive"}
    lines += [json.dumps({**base[20 + i], "label": flipped[base[20 + i]["label"]]}) for i in range(K)]
    lines += [json.dumps({"text": " \t ", "label": "positive"}) for _ in range(K)]  # empty
    lines += ['{"text": "broken", "label": '] * K  # malformed JSON
    lines.append(json.dumps({"text": " ".join(["long"] * 200) + " id-long", "label": "negative"}))  # overlong
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(lines) + "\n")
    leaks = [base[30 + i] for i in range(K)]
    leaks += [{**base[40 + i], "text": one_word_changed(base[40 + i]["text"])} for i in range(K)]
    validation = write_jsonl(tmp_path / "validation.jsonl", [*leaks, *clean_rows(5, seed=99)])
    return {"train": train, "validation": validation, "base": base, "rows": len(lines)}


def config(train: Path, **overrides: Any) -> DataConfig:
    # A one-word change in a 12-word text has Jaccard 11/13 = 0.85; the estimate from 128 minima has
    # a standard deviation of 0.03, so 0.7 leaves a margin of 5 of them (random pairs are near 0.1).
    thresholds = QualityThresholds(near_duplicate_jaccard=0.7, **overrides.pop("thresholds", {}))
    return DataConfig(train=str(train), max_length=64, thresholds=thresholds, **overrides)


def test_every_injected_problem_is_counted(injected: dict[str, Any]) -> None:
    report = check_task_file(
        injected["train"], config(injected["train"]), "classification", None, [injected["validation"]]
    )
    counts = {f.name: f.count for f in report.findings}
    assert counts == {
        "schema_errors": K,
        "empty": K,
        "duplicates": K,
        "near_duplicates": K,
        "conflicting": K,
        "leakage": 2 * K,
        "label_balance": 35,  # rows of the rarest label
        "overlong": 1,
    }
    # 30 + 30 clean rows; copies of rows 0-2, 10-12 and 20-22 (labels flipped); the overlong row.
    assert report.finding("label_balance").stats["labels"] == {"negative": 35, "positive": 35}
    assert report.rows == injected["rows"]
    assert not report.passed
    assert {f.name for f in report.failed} == {"schema_errors", "empty", "conflicting", "leakage"}
    schema = report.finding("schema_errors")
    assert all("malformed JSON" in example for example in schema.examples)
    assert schema.examples[0].startswith(f"{injected['train']}:{60 + 4 * K + 1}:")  # file:line of the first
    assert report.finding("leakage").total == 2 * K + 5
    overlong = report.finding("overlong")
    assert overlong.stats["max"] == 201 and overlong.stats["unit"] == "words" and overlong.stats["truncated"] == 1
    assert "whitespace words" in overlong.detail


def test_label_balance_counts_labelled_rows_and_fails_below_the_minimum(tmp_path: Path) -> None:
    rows = clean_rows(40)
    rows = [row for i, row in enumerate(rows) if row["label"] == "positive" or i < 8]  # 20 positive, 4 negative
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    report = check_task_file(path, config(path, thresholds={"min_class_share": 0.2}), "classification")
    balance = report.finding("label_balance")
    assert (balance.count, balance.total, balance.stats["rarest"]) == (4, 24, "negative")
    assert balance.stats["labels"] == {"positive": 20, "negative": 4}
    assert not balance.passed
    assert check_task_file(path, config(path, thresholds={"min_class_share": 0.1}), "classification").passed


def test_clean_drops_each_problem_with_its_reason_and_keeps_the_rest(injected: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out" / "clean.jsonl"
    report = clean_task_file(
        injected["train"], out, config(injected["train"]), "classification", None, [injected["validation"]]
    )
    dropped = [json.loads(line) for line in dropped_path(out).read_text().splitlines()]
    reasons = Counter(record["reason"] for record in dropped)
    # Conflicting texts lose the original too; leaking rows are the training rows equal/near a validation row.
    assert reasons == {
        "schema_error": K,
        "empty": K,
        "duplicate": K,
        "near_duplicate": K,
        "conflicting": 2 * K,
        "leakage": 2 * K,
    }
    assert report.cleaned is not None and report.cleaned.dropped == dict(reasons)
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.cleaned.kept == len(kept) == injected["rows"] - len(dropped)  # nothing is lost silently
    base = injected["base"]
    expected_gone = {base[20 + i]["text"] for i in range(K)} | {base[30 + i]["text"] for i in range(K)}
    expected_gone |= {base[40 + i]["text"] for i in range(K)}
    assert {row["text"] for row in kept} == {row["text"] for row in base} - expected_gone | {
        " ".join(["long"] * 200) + " id-long"
    }
    by_reason: dict[str, dict[str, Any]] = {}
    for record in dropped:
        by_reason.setdefault(record["reason"], record)  # the first of each reason
    assert by_reason["schema_error"]["raw"] == '{"text": "broken", "label": '
    assert by_reason["duplicate"]["detail"] == f"same text as {injected['train']}:1"
    assert by_reason["near_duplicate"]["detail"] == f"near duplicate of {injected['train']}:11"
    assert "labels 'negative', 'positive'" in by_reason["conflicting"]["detail"]
    assert by_reason["leakage"]["detail"] == f"equal to {injected['validation']}:1"
    assert by_reason["empty"]["row"] == {"text": " \t ", "label": "positive"}
    # The cleaned file passes the checks that clean can fix.
    again = check_task_file(out, config(out), "classification", None, [injected["validation"]])
    assert again.passed and again.finding("duplicates").count == 0


def test_clean_keeps_the_files_own_field_names(tmp_path: Path) -> None:
    rows = [{"review": row["text"], "stars": row["label"]} for row in clean_rows(6)]
    path = write_jsonl(tmp_path / "t.jsonl", [*rows, rows[0], {"review": "", "stars": "positive"}])
    cfg = DataConfig(train=str(path), column_map={"review": "text", "stars": "label"})
    clean_task_file(path, tmp_path / "c.jsonl", cfg, "classification")
    assert [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()] == rows
    dropped = [json.loads(line) for line in dropped_path(tmp_path / "c.jsonl").read_text().splitlines()]
    assert [(d["reason"], d["detail"]) for d in dropped] == [
        ("duplicate", f"same text as {path}:1"),
        ("empty", "empty 'text'; write it or remove the row"),
    ]


def test_clean_refuses_an_output_that_is_not_jsonl_or_is_the_input(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", clean_rows(4))
    with pytest.raises(DataError, match=r"name the output file \.jsonl"):
        clean_task_file(path, tmp_path / "c.csv", DataConfig(train=str(path)), "classification")
    with pytest.raises(DataError, match="would overwrite the input"):
        clean_task_file(path, path, DataConfig(train=str(path)), "classification")


def test_exact_duplicates_ignore_case_and_whitespace_and_near_ones_word_order(tmp_path: Path) -> None:
    base = clean_rows(20)
    text = base[0]["text"]
    variants = [f"  {text.upper()} ", text.replace(" ", "\n  "), " ".join(reversed(text.split()))]
    rows = [Row(r, f"f:{i}") for i, r in enumerate([*base, *({"text": v, "label": "positive"} for v in variants)])]
    report = check_task_rows(rows, DataConfig(train="f"), "classification")  # the default threshold, 0.8
    assert report.finding("duplicates").count == 2
    near = report.finding("near_duplicates")
    assert near.count == 1 and near.examples == ("f:22 (Jaccard ~1.00 with f:0)",)


def test_duplicates_are_found_across_batches_and_in_very_long_rows() -> None:
    rows = clean_rows(5000)  # more rows than one batch holds
    rows += [rows[0], {**rows[1], "text": one_word_changed(rows[1]["text"])}]
    long = " ".join(f"w{i}" for i in range(100_000))  # 600k characters: its minima span several chunks
    rows += [{"text": long, "label": "positive"}, {"text": f"{long} extra", "label": "positive"}]
    report = check_task_rows([Row(r, f"f:{i}") for i, r in enumerate(rows)], config(Path("f")), "classification")
    assert report.finding("duplicates").examples == ("f:5000 (same text as f:0)",)
    near = report.finding("near_duplicates").examples
    assert [example.split(" (")[0] for example in near] == ["f:5001", "f:5003"]
    assert near[1].endswith("with f:5002)")


@pytest.mark.parametrize("overlong", ["truncate", "drop", "error"])
def test_overlong_rows_are_counted_as_data_overlong_treats_them(overlong: str) -> None:
    rows = [Row({"text": " ".join(["word"] * n), "label": "a"}, f"f:{n}") for n in range(1, 41)]
    report = check_task_rows(rows, DataConfig(train="f", max_length=20, overlong=overlong), "classification")
    found = report.finding("overlong")
    assert found.count == 20 and found.stats["p50"] == 20 and found.stats["max"] == 40
    assert (found.stats["truncated"], found.stats["dropped"]) == {
        "truncate": (20, 0),
        "drop": (0, 20),
        "error": (0, 0),
    }[overlong]
    assert not found.passed  # half the rows: over the 5% share, and over 0 rows under "error"
    limit = (0, "data.overlong") if overlong == "error" else (0.05, "data.thresholds.max_overlong_share")
    assert (found.limit, found.setting) == limit


def test_check_passes_clean_data_and_counts_nothing(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", clean_rows(300))
    report = check_task_file(path, DataConfig(train=str(path)), "classification")
    assert report.passed
    assert all(f.count == 0 for f in report.findings if f.name != "label_balance")


def test_csv_rows_with_the_wrong_number_of_values_are_schema_errors(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text('text,label\n"good film, really",positive\nbad,film,negative\n"dull film",negative\n')
    report = check_task_file(path, DataConfig(train=str(path)), "classification")
    assert report.finding("schema_errors").examples == (
        f"{path}:3: 3 values but the header has 2 columns; quote values that contain the delimiter or fix the row",
    )


# ----------------------------------------------------------------------------------- sft


def sft_rows() -> list[dict[str, Any]]:
    def chat(*turns: tuple[str, str], weight: int | None = None) -> dict[str, Any]:
        messages = [{"role": role, "content": content} for role, content in turns]
        if weight is not None:
            messages[-1]["weight"] = weight
        return {"messages": messages}

    return [
        chat(("user", "how are you today"), ("assistant", "very well, thank you")),  # 1: fine
        chat(("user", "one"), ("user", "two"), ("assistant", "three")),  # 2: role order
        chat(("user", "a question"), ("assistant", "an answer"), ("system", "be brief")),  # 3: role order (x2)
        chat(("user", "hello"), ("assistant", "hi"), ("user", "bye")),  # 4: role order (ends with user)
        chat(("user", "ignore this"), ("assistant", "not trained"), weight=0),  # 5: untrainable
        {"prompt": "write a long answer", "completion": "word " * 40},  # 6: EOS cut off by max_length
        {"prompt": "p" * 120, "completion": "short"},  # 7: untrainable once truncated
        {"prompt": "fine prompt", "completion": "fine answer"},  # 8: fine
        {"text": "a plain text row to continue pre-training on"},  # 9: fine
        {"prompt": "no answer", "completion": " "},  # 10: empty
    ]


def test_sft_role_order_untrainable_and_missing_eos_on_the_tiny_llama_tokenizer() -> None:
    rows = [Row(record, f"s.jsonl:{i}") for i, record in enumerate(sft_rows(), start=1)]
    report = check_task_rows(rows, DataConfig(train="s", max_length=64), "sft", make_tiny_byte_tokenizer())
    counts = {f.name: f.count for f in report.findings}
    assert counts == {
        "schema_errors": 0,
        "empty": 1,
        "duplicates": 0,
        "near_duplicates": 0,
        "leakage": 0,
        "overlong": 2,
        "untrainable": 2,
        "missing_eos": 1,
        "role_order": 3,
    }
    assert report.finding("role_order").examples == (
        "s.jsonl:2: messages[0] and messages[1] are both 'user'; merge them or let the turns alternate",
        "s.jsonl:3: messages[2] is a system message after the first turn; put it first",
        "s.jsonl:4: the conversation ends with a 'user' message; end it with the assistant's reply",
    )
    assert report.finding("untrainable").examples == (
        "s.jsonl:5: no token is trained: every assistant message has weight 0",
        "s.jsonl:7: data.max_length (64) cuts the row before its first trained token",
    )
    assert report.finding("missing_eos").examples == ("s.jsonl:6",)
    assert report.finding("overlong").stats["unit"] == "tokens"
    assert report.length_unit == "tokens"


def test_sft_without_a_tokenizer_counts_words_and_skips_the_eos_check() -> None:
    rows = [Row(record, f"s.jsonl:{i}") for i, record in enumerate(sft_rows(), start=1)]
    report = check_task_rows(rows, DataConfig(train="s", max_length=64), "sft")
    assert report.finding("untrainable").count == 1  # weight 0 only: truncation needs tokens
    eos = report.finding("missing_eos")
    assert not eos.checked and eos.passed and "tokenizer" in eos.detail
    assert report.finding("overlong").count == 0 and report.length_unit == "words"


def test_sft_row_the_chat_template_cannot_render_is_a_schema_error() -> None:
    record = {"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "ok"}]}
    report = check_task_rows([Row(record, "s:1")], DataConfig(train="s"), "sft", make_tiny_byte_tokenizer())
    assert report.finding("schema_errors").count == 1
    assert "cannot be rendered" in report.finding("schema_errors").examples[0]
    assert report.finding("role_order").count == 1


def test_clean_drops_untrainable_sft_rows(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", sft_rows())
    out = tmp_path / "c.jsonl"
    report = clean_task_file(path, out, DataConfig(train=str(path), max_length=64), "sft", make_tiny_byte_tokenizer())
    assert report.cleaned is not None and report.cleaned.dropped == {"empty": 1, "untrainable": 2}
    details = [json.loads(line)["detail"] for line in dropped_path(out).read_text().splitlines()]
    assert "weight 0" in details[0] and "data.max_length (64)" in details[1]
    assert len(out.read_text().splitlines()) == 7


# ------------------------------------------------------------------------------ the gate


def test_gate_fails_warns_or_stays_off(injected: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    report = check_task_file(injected["train"], config(injected["train"]), "classification")
    with pytest.raises(DataError) as info:
        gate(report, "fail")
    message = str(info.value)
    assert "3 data quality check(s) failed" in message
    assert f"schema_errors: {K}, limit <= 0 (data.thresholds.max_schema_errors)" in message
    assert "tunesmith data clean" in message and "data.quality: warn" in message
    gate(report, "warn")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("warning: data quality:") for line in lines)
    gate(report, "off")
    assert capsys.readouterr().err == ""
    fine = check_task_rows([Row(clean_rows(1)[0], "f:1")], DataConfig(train="f"), "classification")
    gate(fine, "fail")  # a report that passes goes through silently
    assert fine.passed and capsys.readouterr().err == ""


# ------------------------------------------------------------------------------ the CLI


run_cli = run_cli


def test_cli_check_json_exits_1_with_the_injected_counts(
    injected: dict[str, Any], tiny_bert: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    data = {"train": str(injected["train"]), "thresholds": {"near_duplicate_jaccard": 0.7}}
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({"model": str(tiny_bert), "data": data}))
    args = ("data", "check", injected["train"], "--config", config_path, "--validation", injected["validation"])
    code, out, _ = run_cli(monkeypatch, capsys, *args, "--json", "--html", tmp_path / "r.html", "--max-length", 64)
    assert code == 1
    report = json.loads(out)
    counts = {f["name"]: f["count"] for f in report["findings"]}
    assert counts == {
        "schema_errors": K,
        "empty": K,
        "duplicates": K,
        "near_duplicates": K,
        "conflicting": K,
        "leakage": 2 * K,
        "label_balance": 35,
        "overlong": 1,
    }
    assert set(report["failed"]) == {"schema_errors", "empty", "conflicting", "leakage"}
    assert report["length_unit"] == "tokens"  # the tiny BERT's tokenizer, from the config's model
    page = (tmp_path / "r.html").read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page and "http" not in page
    assert "malformed JSON" in page


def test_cli_check_exits_0_on_clean_data_and_prints_a_table(tmp_path: Path, monkeypatch, capsys) -> None:
    path = write_jsonl(tmp_path / "t.jsonl", clean_rows(50))
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", path)
    assert code == 0
    assert "50 rows (classification), passed" in " ".join(out.split())
    assert "near_duplicates" in out and "label_balance" in out


def test_cli_clean_writes_kept_and_dropped_rows(injected: dict[str, Any], tmp_path: Path, monkeypatch, capsys) -> None:
    out = tmp_path / "clean.jsonl"
    code, _, err = run_cli(monkeypatch, capsys, "data", "clean", injected["train"], "-o", out, "--json")
    assert code == 0
    dropped = [json.loads(line) for line in dropped_path(out).read_text().splitlines()]
    kept = out.read_text().splitlines()
    assert len(kept) + len(dropped) == injected["rows"]
    assert {"schema_error", "empty", "duplicate", "conflicting"} <= {d["reason"] for d in dropped}
    assert f"kept {len(kept)}, dropped {len(dropped)}" in " ".join(err.split())


def test_cli_usage_errors_exit_2(tmp_path: Path, monkeypatch, capsys) -> None:
    code, _, err = run_cli(monkeypatch, capsys, "data", "check", tmp_path / "nope.jsonl")
    assert code == 2 and "nope.jsonl: no such file" in err
    path = write_jsonl(tmp_path / "t.jsonl", clean_rows(4))
    code, _, err = run_cli(monkeypatch, capsys, "data", "check", path, "--task", "regression")
    from tunesmith import registry

    *first, last = registry.tasks()
    assert code == 2 and f"use {', '.join(first)} or {last}" in err and "classification, image-classification" in err


def test_cli_with_an_sft_config_uses_its_model_tokenizer_and_validation(
    tiny_llama: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    train = write_jsonl(tmp_path / "s.jsonl", sft_rows())
    validation = write_jsonl(tmp_path / "v.jsonl", [sft_rows()[0], {"prompt": "other", "completion": "thing"}])
    run = {"model": str(tiny_llama), "task": "sft", "data": {"train": str(train), "validation": str(validation)}}
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump({**run, "data": {**run["data"], "max_length": 64}}))
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", train, "--config", config_path, "--json")
    assert code == 1
    report = json.loads(out)
    assert report["task"] == "sft" and report["length_unit"] == "tokens"
    counts = {f["name"]: f["count"] for f in report["findings"]}
    assert counts["leakage"] == 1 and counts["missing_eos"] == 1 and counts["untrainable"] == 2
    code, _, err = run_cli(
        monkeypatch, capsys, "data", "check", train, "--config", config_path, "--task", "classification"
    )
    assert code == 2 and "leave out --task" in err


# ------------------------------------------------------------------- streaming and parts


def test_iter_rows_streams_and_reports_unreadable_records(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "a"}\n{"text": \n[1, 2]\n\n{"text": "caf\xe9"}\n{"text": "b"}\n')
    bad: list[UnreadableRow] = []
    rows = list(iter_rows(path, on_error=bad.append))
    assert rows == [Row({"text": "a"}, f"{path}:1"), Row({"text": "b"}, f"{path}:6")]
    assert [(b.where, b.problem.split(" (")[0].split(";")[0]) for b in bad] == [
        (f"{path}:2", "malformed JSON"),
        (f"{path}:3", 'a JSONL line must be a JSON object like {"text": ..., "label": ...}, got list'),
        (f"{path}:5", "not valid UTF-8"),
    ]
    assert bad[2].raw == '{"text": "caf\ufffd"}'
    with pytest.raises(DataError, match=r"d\.jsonl:2: malformed JSON"):
        list(iter_rows(path))
    items = list(stream_rows(path))
    assert [type(item).__name__ for item in items] == ["Row", "UnreadableRow", "UnreadableRow", "UnreadableRow", "Row"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("d.jsonl", '{"a": 1, "b": "x"}\n\n{"a": 2, "b": "y"}\n'),
        ("d.csv", 'a,b\n1,"multi\nline"\n\n2,y\n'),
        ("d.tsv", "a\tb\n1\tx\n2\ty\n"),
        ("d.json", '[{"a": 1, "b": "x"}, {"a": 2}]'),
    ],
)
def test_iter_rows_gives_what_read_rows_gives(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    assert list(iter_rows(path, {"a": "id"})) == read_rows(path, {"a": "id"})


def test_iter_rows_checks_the_column_map_and_empty_files_at_the_end(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}])
    with pytest.raises(DataError, match="'review' that no row has"):
        list(iter_rows(path, {"review": "text"}))
    (tmp_path / "e.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="no rows"):
        list(iter_rows(tmp_path / "e.csv"))


def test_key_index_finds_the_earliest_row_and_the_first_matches_like_brute_force() -> None:
    rng = np.random.default_rng(0)
    index = KeyIndex(np.uint32)
    keys = rng.integers(0, 50, 3000).astype(np.uint32)
    for start in range(0, len(keys), 128):  # batches: many runs, merged
        index.add(keys[start : start + 128], np.arange(start, min(start + 128, len(keys))))
    queries = np.arange(60, dtype=np.uint32)
    expected = [int(np.flatnonzero(keys == q)[0]) if (keys == q).any() else -1 for q in queries]
    assert index.first(queries).tolist() == expected
    found = index.matches(queries, cap=2)
    for q, row in zip(queries, found, strict=True):
        assert set(row[row >= 0].tolist()) <= set(np.flatnonzero(keys == q).tolist())
    assert len(index) == len(keys)


def test_minhash_estimates_jaccard_within_a_tenth() -> None:
    rng = random.Random(1)
    vocabulary = [f"w{i}" for i in range(5000)]
    pairs = []
    for _ in range(40):
        shared = rng.sample(vocabulary, rng.randint(5, 60))
        a = shared + rng.sample(vocabulary, rng.randint(0, 30))
        b = shared + rng.sample(vocabulary, rng.randint(0, 30))
        pairs.append((" ".join(a[:19]), " ".join(b[:19])))  # under 20 words: single-word shingles
    sigs = signatures([text for pair in pairs for text in pair])
    estimate = estimate_jaccard((sigs[0::2] & 255).astype(np.uint8), (sigs[1::2] & 255).astype(np.uint8))
    truth = [len(set(a.split()) & set(b.split())) / len(set(a.split()) | set(b.split())) for a, b in pairs]
    assert np.abs(estimate - np.array(truth)).max() < 0.1


def test_report_to_dict_is_json_and_html_escapes_the_data(tmp_path: Path) -> None:
    rows = [Row({"text": "<b>x</b>", "label": "a"}, "f:1"), Row({"text": "<b>x</b>", "label": "a"}, "f:2")]
    report = check_task_rows(rows, DataConfig(train="f"), "classification", source="<f>")
    assert json.loads(json.dumps(report.to_dict()))["findings"][2]["count"] == 1
    page = report_html(report)
    assert "<f>" not in page and "&lt;f&gt;" in page


def test_clean_with_conflicts_in_more_rows_than_one_growth_step(tmp_path: Path) -> None:
    """Regression: per-row arrays that only grew when set were shorter than the rows read, and
    settling conflicts at the end failed once a file passed their first 1,024 rows."""
    rows = clean_rows(1500)
    flipped = {**rows[0], "label": "negative" if rows[0]["label"] == "positive" else "positive"}
    rows.insert(1, flipped)  # early: nothing after row 1 relates to another row
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    report = clean_task_file(train, tmp_path / "out.jsonl", config(train), "classification")
    assert report.finding("conflicting").count == 1
    assert sum(1 for _ in (tmp_path / "out.jsonl").open()) == 1499  # both rows of the conflicting text dropped
