"""The real CLI on the packaged models for learning from preferences, a few steps each: a reward
model on MiniLM (and `tunesmith score`), DPO and RL on SmolLM2 with LoRA, and pairs sampled from
SmolLM2 and ranked by a reward function."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import run_tunesmith

pytestmark = pytest.mark.slow

REWARD = """
def positive_words(prompts, completions):
    # Positive words, plus a little for length, so that samples of 8 tokens rarely tie.
    return [sum(w in c.lower() for w in ("great", "good", "love")) + len(c) / 100 for c in completions]
"""


def only_run(directory: Path) -> Path:
    (run_dir,) = directory.iterdir()
    return run_dir


def test_reward_model_then_score(tmp_path: Path) -> None:
    quick = ["data.limit=64", "train.max_steps=4", "train.batch_size=8", f"output.dir={tmp_path}"]
    done = run_tunesmith("train", "configs/reward-reviews.yaml", *quick)
    assert done.returncode == 0, done.stderr
    run_dir = only_run(tmp_path)
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert {"accuracy", "margin"} <= set(metrics["validation"])
    scored = run_tunesmith(
        "score", run_dir, "--prompt", "Write a short review of the movie Up.", "--response", "A joy."
    )
    assert scored.returncode == 0, scored.stderr
    assert math.isfinite(float(scored.stdout.split()[0]))


def test_dpo_on_smollm2(tmp_path: Path) -> None:
    quick = [
        "data.limit=16",
        "data.validation=0.01",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.log_every=1",
        f"output.dir={tmp_path}",
    ]
    done = run_tunesmith("train", "configs/dpo-reviews.yaml", *quick)
    assert done.returncode == 0, done.stderr
    run_dir = only_run(tmp_path)
    first = next(json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference at the start (bf16)
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert {"accuracy", "margin", "logps_chosen", "logps_rejected"} <= set(metrics["validation"])


def test_rl_on_smollm2_with_a_reward_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "review_rewards.py").write_text(REWARD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # where the subprocess imports the reward from
    quick = [
        "rl.reward=review_rewards:positive_words",
        "rl.max_new_tokens=8",
        "rl.group_size=2",
        "data.limit=4",
        "data.validation=0.01",
        "train.max_steps=2",
        "train.batch_size=2",
        f"output.dir={tmp_path / 'runs'}",
    ]
    done = run_tunesmith("train", "configs/rl-reviews.yaml", *quick)
    assert done.returncode == 0, done.stderr
    run_dir = only_run(tmp_path / "runs")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["reward"]["spec"] == "review_rewards:positive_words"
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert {"reward", "kl", "completion_tokens"} <= set(train[-1])

    pairs = run_tunesmith(
        "data",
        "pairs",
        "rotten-tomatoes-prompts-held-out",
        "-o",
        tmp_path / "pairs.jsonl",
        "--policy",
        "smollm2-135m",
        "--reward",
        "review_rewards:positive_words",
        "--samples",
        "2",
        "--max-new-tokens",
        "6",
    )
    assert pairs.returncode == 0, pairs.stderr
    assert "pairs from 52 prompts" in pairs.stderr
