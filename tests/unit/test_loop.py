"""The training loop: exact resume, refusal to resume a different run, early stopping, logs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tunesmith
from conftest import Interrupt, final_weights, interrupt_and_resume, stop_at
from tunesmith.errors import ConfigError


def _only_run(parent: Path) -> Path:
    (run,) = [p for p in parent.iterdir() if p.is_dir()]
    return run


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resumed_run_ends_with_the_same_weights(base_config: dict, tmp_path: Path, method: str) -> None:
    cfg = {**base_config, "method": method, "train": {**base_config["train"], "save_every": 3, "epochs": 3}}

    def interrupted(broken: Path) -> None:
        assert not (broken / "final").exists()
        assert sorted(p.name for p in (broken / "checkpoints").glob("step-*")) == ["step-0000006", "step-0000009"]
        (broken / "checkpoints" / ".tmp-half-written").mkdir()  # as a kill during a save leaves it

    whole, resumed = interrupt_and_resume(tmp_path, 11, interrupted, **{k: v for k, v in cfg.items() if k != "output"})
    broken = resumed.run_dir
    assert broken.parent == tmp_path / "broken"
    assert not (broken / "checkpoints" / ".tmp-half-written").exists()
    expected, got = final_weights(whole.run_dir), final_weights(broken)
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    assert resumed.metrics["validation"]["accuracy"] == whole.metrics["validation"]["accuracy"]


def test_resume_refuses_a_changed_config(base_config: dict, tmp_path: Path) -> None:
    cfg = {**base_config, "train": {**base_config["train"], "save_every": 2}}
    with pytest.raises(Interrupt):
        tunesmith.train(callbacks=[stop_at(5)], **cfg)
    broken = _only_run(Path(cfg["output"]))
    with pytest.raises(ConfigError, match="config differs"):
        tunesmith.train(broken / "config.yaml", resume=broken, overrides=["train.lr=0.001"])


def test_resume_refuses_changed_data(base_config: dict, tmp_path: Path, sentiment_file: Path) -> None:
    cfg = {**base_config, "train": {**base_config["train"], "save_every": 2}}
    with pytest.raises(Interrupt):
        tunesmith.train(callbacks=[stop_at(5)], **cfg)
    broken = _only_run(Path(cfg["output"]))
    with sentiment_file.open("a") as fh:
        fh.write(json.dumps({"text": "a new good row", "label": "positive"}) + "\n")
    with pytest.raises(ConfigError, match="data differs"):
        tunesmith.train(broken / "config.yaml", resume=broken)


def test_resume_without_checkpoint_is_refused(base_config: dict, tmp_path: Path) -> None:
    with pytest.raises(Interrupt):
        tunesmith.train(callbacks=[stop_at(1)], **base_config)
    broken = _only_run(Path(base_config["output"]))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        tunesmith.train(broken / "config.yaml", resume=broken)


def test_early_stopping_stops_and_restores_the_best(base_config: dict) -> None:
    cfg = {
        **base_config,
        "method": "full",
        "train": {
            **base_config["train"],
            "epochs": 30,
            "lr": 0.5,  # far too high: validation loss gets worse after the first evaluation
            "eval_every": 2,
            "early_stopping": {"metric": "loss", "patience": 2},
        },
    }
    result = tunesmith.train(**cfg)
    info = result.metrics["train"]
    assert info["stopped_early"]
    assert info["steps"] < 30 * 9
    evals = [
        m for m in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines()) if m["kind"] == "eval"
    ]
    best = min(evals, key=lambda m: m["metrics"]["loss"])
    assert info["best"]["step"] == best["step"]
    # The final weights are the best checkpoint's, so the final validation loss is the best one.
    assert result.metrics["validation"]["loss"] == pytest.approx(best["metrics"]["loss"], rel=1e-5)


def test_run_directory_records_everything(base_config: dict) -> None:
    result = tunesmith.train(**base_config)
    run = result.run_dir
    for name in ("config.yaml", "manifest.json", "plan.json", "metrics.jsonl", "eval.json"):
        assert (run / name).is_file(), name
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["seed"] == 42
    assert manifest["packages"]["torch"]
    assert len(manifest["data"]) == 1 and len(next(iter(manifest["data"].values()))) == 64
    assert len(manifest["base_model"]["sha256"]) == 64
    kinds = [json.loads(line)["kind"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("eval") == 2  # one per epoch
    assert "train" in kinds
    plan = json.loads((run / "plan.json").read_text())
    assert plan["trainable_parameters"] == result.metrics["train"]["trainable_parameters"]
    assert plan["labels"] == ["negative", "positive"]


def test_bf16_autocast_trains(base_config: dict) -> None:
    cfg = {**base_config, "method": "full", "train": {**base_config["train"], "precision": "bf16"}}
    result = tunesmith.train(**cfg)
    assert result.metrics["train"]["precision"] == "bf16"
    weights = final_weights(result.run_dir)
    assert all(t.dtype == torch.float32 for t in weights.values())  # fp32 master weights
    assert result.metrics["validation"]["loss"] < 0.69


@pytest.mark.parametrize("method", [{"name": "partial", "freeze_layers": 1}, "feature-extraction", "lora"])
def test_bf16_runs_with_frozen_work_cached(base_config: dict, method: object) -> None:
    """Regression: frozen weights stored in bf16 before the cache's fp32 split check broke `partial`."""
    cfg = {**base_config, "method": method, "train": {**base_config["train"], "precision": "bf16", "max_steps": 2}}
    result = tunesmith.train(**cfg)
    assert result.metrics["train"]["steps"] == 2 and result.metrics["train"]["precision"] == "bf16"
