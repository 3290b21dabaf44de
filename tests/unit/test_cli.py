"""The CLI: a user's bad input gets one clear message naming file/line/key and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import invoke_cli


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code, out, err = invoke_cli(monkeypatch, capsys, *args)
    return code, " ".join((out + err).split())  # rich wraps long lines


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
    code, out = run_cli(monkeypatch, capsys, "train", config)
    assert code == 2
    assert "error:" in out and expected in out
    assert "Traceback" not in out


def test_eval_labels_unseen_in_training(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    code, _ = run_cli(monkeypatch, capsys, "train", config, "train.epochs=1")
    assert code == 0
    (run_dir,) = Path(base_config["output"]).iterdir()
    other = write(tmp_path / "eval.jsonl", json.dumps({"text": "good", "label": "neutral"}) + "\n")
    code, out = run_cli(monkeypatch, capsys, "eval", run_dir, "--data", other)
    assert code == 2
    assert "neutral" in out and "eval.jsonl:1" in out


def test_unknown_method_and_key(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    code, out = run_cli(monkeypatch, capsys, "train", config, "method.name=lorra", "train.epoch=2")
    assert code == 2
    assert "unknown method 'lorra'; did you mean 'lora'?" in out
    assert f"error: {config}: " in out  # the message names the config file


def test_method_that_does_not_fit_the_model(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    code, out = run_cli(monkeypatch, capsys, "train", config, "method.target_modules=[q_proj]")
    assert code == 2
    assert "method.target_modules: q_proj match no linear or conv layer of BertModel" in out
    code, out = run_cli(monkeypatch, capsys, "train", config, "method.name=partial", "method.freeze_layers=9")
    assert code == 2
    assert "method.freeze_layers=9: the model has only 2 blocks" in out


def test_missing_model_directory(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    code, out = run_cli(monkeypatch, capsys, "train", config, f"model.name={tmp_path}/no-model")
    assert code == 2
    assert "no-model: no such directory" in out


def test_train_predict_eval_runs_ls_show(tmp_path: Path, base_config: dict, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    code, out = run_cli(monkeypatch, capsys, "train", config)
    assert code == 0 and "run directory:" in out
    (run_dir,) = Path(base_config["output"]).iterdir()
    code, out = run_cli(monkeypatch, capsys, "predict", run_dir, "a good movie")
    assert code == 0 and ("positive" in out or "negative" in out)
    preds = tmp_path / "preds.jsonl"
    code, _ = run_cli(monkeypatch, capsys, "predict", run_dir, "--data", base_config["data"]["train"], "-o", preds)
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert code == 0 and len(rows) == 96
    assert all(abs(sum(r["scores"].values()) - 1) < 1e-4 for r in rows)
    code, out = run_cli(monkeypatch, capsys, "eval", run_dir, "--data", base_config["data"]["train"], "--json")
    assert code == 0 and json.loads(out)["count"] == 96
    code, out = run_cli(monkeypatch, capsys, "runs", "ls", base_config["output"])
    assert code == 0 and "done" in out
    code, out = run_cli(monkeypatch, capsys, "runs", "show", run_dir)
    assert code == 0 and "accuracy" in out
    code, out = run_cli(monkeypatch, capsys, "validate", config)
    assert code == 0 and "valid" in out
    code, out = run_cli(monkeypatch, capsys, "methods")
    assert code == 0 and all(m in out for m in ("full", "feature-extraction", "prefix-tuning", "ia3"))
