"""The data quality gate runs before every training run: fail stops it, warn reports, off skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith
from conftest import write_jsonl
from tunesmith.errors import DataError


def _with_conflict(base_config: dict, tmp_path: Path) -> dict:
    rows = [json.loads(line) for line in Path(base_config["data"]["train"]).read_text().splitlines()]
    rows += [{"text": "an odd unique film", "label": "positive"}, {"text": "an odd unique film", "label": "negative"}]
    base_config["data"]["train"] = str(write_jsonl(tmp_path / "conflict.jsonl", rows))
    base_config["train"]["max_steps"] = 1
    return base_config


def test_fail_stops_before_any_model_is_loaded(base_config: dict, tmp_path: Path) -> None:
    cfg = _with_conflict(base_config, tmp_path)
    cfg["data"]["quality"] = "fail"
    with pytest.raises(DataError, match="conflicting"):
        tunesmith.train(**cfg)
    assert not Path(cfg["output"]).exists()  # no run directory was made


def test_warn_trains_and_saves_the_report(base_config: dict, tmp_path: Path, capsys) -> None:
    cfg = _with_conflict(base_config, tmp_path)
    result = tunesmith.train(**cfg)  # data.quality defaults to warn
    assert "conflicting" in capsys.readouterr().err
    report = json.loads((result.run_dir / "data_report.json").read_text())
    conflicting = next(f for f in report["findings"] if f["name"] == "conflicting")
    assert conflicting["count"] == 1 and not conflicting["passed"]
    assert "id='data'" in (result.run_dir / "report.html").read_text()


def test_off_skips_the_gate(base_config: dict, tmp_path: Path) -> None:
    cfg = _with_conflict(base_config, tmp_path)
    cfg["data"]["quality"] = "off"
    result = tunesmith.train(**cfg)
    assert not (result.run_dir / "data_report.json").exists()


def test_check_and_clean_through_the_python_api(base_config: dict, tmp_path: Path) -> None:
    cfg = _with_conflict(base_config, tmp_path)
    report = tunesmith.check_data(cfg["data"]["train"])
    assert report.finding("conflicting").count == 1 and not report.passed
    cleaned = tunesmith.clean_data(cfg["data"]["train"], tmp_path / "clean.jsonl")
    assert cleaned.cleaned is not None
    dropped = [json.loads(line) for line in (tmp_path / "clean.dropped.jsonl").read_text().splitlines()]
    assert {d["reason"] for d in dropped} >= {"conflicting"}
