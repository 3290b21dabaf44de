"""Few-shot sampling, replay mixing and retention (forgetting) measurement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith
from conftest import interrupt_and_resume, write_jsonl
from tunesmith.data.mix import few_shot, replay_rows
from tunesmith.data.records import Example
from tunesmith.errors import ConfigError, DataError


def _examples(n_per_label: int) -> list[Example]:
    return [Example(f"text {label} {i}", label) for label in ("a", "b", "c") for i in range(n_per_label)]


def test_few_shot_takes_k_per_label_reproducibly() -> None:
    examples = _examples(20)
    first = few_shot(examples, 4, seed=1)
    assert sorted(e.label for e in first) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4
    assert few_shot(examples, 4, seed=1) == first
    assert few_shot(examples, 4, seed=2) != first
    assert len(few_shot(examples, 50, seed=1)) == 60  # a label with fewer than K keeps all of them
    with pytest.raises(DataError, match="few_shot"):
        few_shot(examples, 0, seed=1)


def test_replay_rows_make_up_the_fraction() -> None:
    replay = _examples(2)  # 6 rows, fewer than needed: cycled
    added = replay_rows(replay, n_train=90, fraction=0.25, seed=0)
    assert len(added) == 30  # 30 / (90 + 30) = 0.25
    assert set(added) == set(replay)
    assert replay_rows(replay, 90, 0.25, seed=0) == added


def test_few_shot_and_replay_in_a_classification_run(base_config: dict, tmp_path: Path) -> None:
    replay = write_jsonl(tmp_path / "replay.jsonl", [{"text": "great film", "label": "positive"}] * 3)
    base_config["data"].update(few_shot=5, replay={"path": str(replay), "fraction": 0.5})
    result = tunesmith.train(**base_config)
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["rows"]["train"] == 20 and plan["rows"]["replayed"] == 10  # 5 per label, then half replay
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert str(replay) in manifest["data"]


@pytest.fixture()
def sft_run(tiny_llama: Path, tmp_path: Path) -> dict:
    words = ["red", "blue", "green", "gold"]
    rows = [{"prompt": f"colour of {words[i % 4]} {i}?", "completion": words[i % 4]} for i in range(48)]
    # Bytes the training rows never use: as training moves probability to its own bytes, the model
    # gets worse at these, which is forgetting in miniature.
    retention = [{"text": f"ZQXJ {i} VWKY *+=# ZQXJ VWKY"} for i in range(12)]
    return {
        "model": str(tiny_llama),
        "task": "sft",
        "method": "full",
        "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", rows)), "validation": 0.25, "max_length": 64},
        "train": {"epochs": 3, "batch_size": 8, "lr": 2e-2, "precision": "fp32", "save_every": 2},
        "eval": {
            "samples": 0,
            "exact_match_rows": 2,
            "retention": {"data": str(write_jsonl(tmp_path / "keep.jsonl", retention)), "max_rows": 8},
        },
        "output": str(tmp_path / "runs"),
    }


def test_retention_is_measured_before_and_at_every_evaluation(sft_run: dict) -> None:
    result = tunesmith.train(**sft_run)
    logged = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    kept = [m for m in logged if m["kind"] == "retention"]
    evals = [m for m in logged if m["kind"] == "eval"]
    assert [m["step"] for m in kept] == [0] + [m["step"] for m in evals]
    assert all(m["baseline"] == kept[0]["value"] for m in kept)
    summary = result.metrics["retention"]
    assert summary["metric"] == "perplexity" and summary["baseline"] == kept[0]["value"]
    assert summary["change"] == pytest.approx((summary["value"] - summary["baseline"]) / summary["baseline"])
    assert summary["change"] > 0  # training on other text made the model worse at it


def test_max_drop_stops_and_keeps_the_best_within_the_bound(sft_run: dict) -> None:
    sft_run["train"].update(epochs=6, eval_every=2)
    free = tunesmith.train(**sft_run)
    history = free.metrics["retention"]["history"]
    # a bound between the first and the last evaluation's change: training must stop before the end
    bound = (max(history[1]["change"], 0.0) + history[-1]["change"]) / 2
    assert history[1]["change"] < bound < history[-1]["change"]
    sft_run["eval"]["retention"]["max_drop"] = bound
    bounded = tunesmith.train(**sft_run)
    summary = bounded.metrics["retention"]
    assert bounded.metrics["train"]["stopped_early"] and summary["stopped_for_retention"]
    assert summary["change"] <= bound + 1e-9  # the weights kept are the best within the bound
    assert bounded.metrics["train"]["best"]["step"] < bounded.metrics["train"]["steps"]


def test_classification_retention_needs_data(base_config: dict) -> None:
    base_config["eval"] = {"retention": {"metric": "accuracy"}}
    with pytest.raises(ConfigError, match="no default retention set"):
        tunesmith.train(**base_config)


def test_a_resumed_run_keeps_the_base_models_retention_baseline(sft_run: dict, tmp_path: Path) -> None:
    whole, resumed = interrupt_and_resume(tmp_path, 3, **{k: v for k, v in sft_run.items() if k != "output"})
    assert resumed.metrics["retention"]["baseline"] == whole.metrics["retention"]["baseline"]
    assert resumed.metrics["retention"]["value"] == pytest.approx(whole.metrics["retention"]["value"], rel=1e-6)
