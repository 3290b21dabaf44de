"""The CLI: a user's bad input gets one clear message naming file/line/key and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tunesmith
from conftest import run_cli, write_jsonl


def write_config(tmp_path: Path, base_config: dict, **data: object) -> Path:
    cfg = {**base_config, "data": {**base_config["data"], **data}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


CASES = {
    "missing file": (lambda d: d / "nope.jsonl", "nope.jsonl: no such file"),
    "malformed json": (
        lambda d: write(d / "bad.jsonl", '{"text": "good", "label": "positive"}\n{"text": "bad", "label":\n'),
        "bad.jsonl:2",
    ),
    "missing field": (
        lambda d: write(
            d / "nofield.jsonl", '{"text": "good", "label": "positive"}\n{"txt": "bad", "label": "negative"}\n'
        ),
        "nofield.jsonl:2: missing field 'text'",
    ),
    "empty": (lambda d: write(d / "empty.jsonl", "\n\n"), "empty.jsonl: no rows"),
    "one class": (
        lambda d: write(
            d / "one.jsonl", "".join(json.dumps({"text": f"good {i}", "label": "positive"}) + "\n" for i in range(8))
        ),
        "only one class 'positive'",
    ),
    "non utf8": (
        lambda d: write(
            d / "latin.jsonl", b'{"text": "good", "label": "positive"}\n{"text": "caf\xe9", "label": "negative"}\n'
        ),
        "latin.jsonl:2",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_training_data(case: str, tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    make, expected = CASES[case]
    config = write_config(tmp_path, base_config, train=str(make(tmp_path)))
    result = run_cli(monkeypatch, capsys, "train", config)
    code, out = result.code, result.text
    assert code == 2
    assert "error:" in out and expected in out
    assert "Traceback" not in out


def test_eval_labels_unseen_in_training(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    result = run_cli(monkeypatch, capsys, "train", config, "train.epochs=1")
    code, _ = result.code, result.text
    assert code == 0
    (run_dir,) = Path(base_config["output"]).iterdir()
    other = write(tmp_path / "eval.jsonl", json.dumps({"text": "good", "label": "neutral"}) + "\n")
    result = run_cli(monkeypatch, capsys, "eval", run_dir, "--data", other)
    code, out = result.code, result.text
    assert code == 2
    assert "neutral" in out and "eval.jsonl:1" in out


def test_unknown_method_and_key(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    result = run_cli(monkeypatch, capsys, "train", config, "method.name=lorra", "train.epoch=2")
    code, out = result.code, result.text
    assert code == 2
    assert "unknown method 'lorra'; did you mean 'lora'?" in out
    assert f"error: {config}: " in out  # the message names the config file


def test_method_that_does_not_fit_the_model(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    result = run_cli(monkeypatch, capsys, "train", config, "method.target_modules=[q_proj]")
    code, out = result.code, result.text
    assert code == 2
    assert "method.target_modules: q_proj match no linear or conv layer of BertModel" in out
    result = run_cli(monkeypatch, capsys, "train", config, "method.name=partial", "method.freeze_layers=9")
    code, out = result.code, result.text
    assert code == 2
    assert "method.freeze_layers=9: the model has only 2 blocks" in out


def test_missing_model_directory(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    result = run_cli(monkeypatch, capsys, "train", config, f"model.name={tmp_path}/no-model")
    code, out = result.code, result.text
    assert code == 2
    assert "no-model: no such directory" in out


def test_train_predict_eval_runs_ls_show(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    result = run_cli(monkeypatch, capsys, "train", config)
    code, out = result.code, result.text
    assert code == 0 and "run directory:" in out
    (run_dir,) = Path(base_config["output"]).iterdir()
    result = run_cli(monkeypatch, capsys, "predict", run_dir, "a good movie")
    code, out = result.code, result.text
    (row,) = tunesmith.predict(run_dir, ["a good movie"])
    assert code == 0 and out == f"{row['label']} ({row['scores'][row['label']]:.3f})"
    preds = tmp_path / "preds.jsonl"
    result = run_cli(monkeypatch, capsys, "predict", run_dir, "--data", base_config["data"]["train"], "-o", preds)
    code, _ = result.code, result.text
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert code == 0 and len(rows) == 96
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-4 for r in rows)
    result = run_cli(monkeypatch, capsys, "eval", run_dir, "--data", base_config["data"]["train"], "--json")
    code, out = result.code, result.text
    assert code == 0 and json.loads(out)["count"] == 96
    result = run_cli(monkeypatch, capsys, "runs", "ls", base_config["output"])
    code, out = result.code, result.text
    accuracy = json.loads((run_dir / "eval.json").read_text())["validation"]["accuracy"]
    assert code == 0 and "done" in out and f"accuracy {accuracy:.4f}" in out and "macro_f1" in out
    result = run_cli(monkeypatch, capsys, "runs", "show", run_dir)
    code, out = result.code, result.text
    assert code == 0 and "accuracy" in out
    result = run_cli(monkeypatch, capsys, "validate", config)
    code, out = result.code, result.text
    assert code == 0 and "valid" in out
    result = run_cli(monkeypatch, capsys, "methods")
    code, out = result.code, result.text
    assert code == 0 and all(m in out for m in ("full", "feature-extraction", "prefix-tuning", "ia3"))


def test_output_that_is_a_file_is_one_clear_line(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    blocking = write(tmp_path / "runs-file", "not a directory")
    config = write_config(tmp_path, {**base_config, "output": str(blocking)})
    result = run_cli(monkeypatch, capsys, "train", config)
    assert result.code == 2 and "Traceback" not in result.text
    assert f"error: output.dir={blocking}: {blocking} is a file, not a directory" in result.text


def test_data_check_on_a_narrow_terminal_prints_whole_paths(tmp_path: Path, monkeypatch, capsys) -> None:
    """The table of checks fits 80 columns; what each failed check found follows it, one row per line,
    with its full origin."""
    deep = tmp_path / "a-rather-long-directory-name" / "and-another-level-below-it"
    deep.mkdir(parents=True)
    rows = [{"text": f"review number {i} of a film", "label": "pos" if i % 2 else "neg"} for i in range(20)]
    path = write_jsonl(deep / "reviews-with-a-long-file-name.jsonl", [*rows, {"text": "  ", "label": "pos"}])
    monkeypatch.setenv("COLUMNS", "80")
    result = run_cli(monkeypatch, capsys, "data", "check", path)
    assert result.code == 1
    lines = result.out.splitlines()
    assert f"  {path}:21: empty 'text' (whitespace only); write it or remove the row" in lines
    table = [line for line in lines if line[:1] in "┏┃┡│└"]
    assert len(table) == 12 and all(len(line) <= 80 for line in table)  # 8 checks, a header and 3 rules
