"""Reinforcement learning from a reward on a tiny Llama built in-process: the policy moves towards
what a reward function or a reward model prefers, the KL to the base model is measured, what the
reward is goes into the manifest, a failing reward skips steps instead of corrupting weights, and
an interrupted run resumes exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import tunesmith
from conftest import interrupt_and_resume, write_jsonl
from tunesmith.errors import ConfigError

REWARDS = """
import math

def letters(prompts, completions):
    return [float(sum(ch.isascii() and ch.isalpha() for ch in c)) for c in completions]

def half_nan(prompts, completions):
    return [math.nan if i % 2 else float(len(c)) for i, c in enumerate(completions)]

def broken(prompts, completions):
    raise RuntimeError("no scores today")
"""


@pytest.fixture()
def rewards_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "toy_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "toy_rewards"


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review movie {i}"} for i in range(24)])


def rl_run(model: Path, data: Path, out: Path, reward: str, method: object = "lora", **train: object):
    return tunesmith.train(
        model=str(model),
        task="rl",
        method=method,
        rl={"reward": reward, "group_size": 4, "max_new_tokens": 8},
        data={"train": str(data), "validation": 0.25, "max_length": 32},
        eval={"baseline": True},
        train={"epochs": 4, "batch_size": 3, "lr": 2e-2, "log_every": 1, "precision": "fp32", **train},
        output=str(out),
    )


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_rl_moves_towards_the_reward_and_records_it(
    tiny_llama: Path, prompts: Path, tmp_path: Path, rewards_module: str
) -> None:
    # The tiny random model emits random bytes; the reward counts the ASCII letters among them.
    result = rl_run(tiny_llama, prompts, tmp_path / "runs", f"{rewards_module}:letters", "full", lr=1e-2)
    before, after = result.metrics["baseline"]["validation"], result.metrics["validation"]
    assert after["reward"] > before["reward"] + 0.5  # 1.96 -> 3.08 letters per 8-token completion
    assert after["kl"] > before["kl"] >= 0 and after["count"] == 24  # 6 prompts x 4 samples
    train = records(result.run_dir, "train")
    assert {"reward", "kl", "completion_tokens", "invalid_rewards"} <= set(train[-1])
    samples = records(result.run_dir, "samples")[-1]["samples"]
    assert len(samples) == 4 and {"prompt", "output", "reward"} <= set(samples[0])
    manifest = json.loads((result.run_dir / "manifest.json").read_text())
    assert manifest["reward"]["spec"] == f"{rewards_module}:letters" and len(manifest["reward"]["sha256"]) == 64


def test_rl_with_lora_uses_the_base_with_the_adapter_off_as_reference(
    tiny_llama: Path, prompts: Path, tmp_path: Path, rewards_module: str
) -> None:
    result = rl_run(tiny_llama, prompts, tmp_path, f"{rewards_module}:letters", epochs=2)
    assert result.metrics["baseline"]["validation"]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy = reference
    assert result.metrics["validation"]["kl"] > 0
    evaluated = tunesmith.evaluate(result.run_dir, prompts)  # a finished run samples and scores again
    assert evaluated["count"] == 24 * 4 and evaluated["kl"] > 0 and math.isfinite(evaluated["reward"])


def test_rewards_that_fail_are_counted_and_never_reach_the_weights(
    tiny_llama: Path, prompts: Path, tmp_path: Path, rewards_module: str
) -> None:
    partial = rl_run(tiny_llama, prompts, tmp_path / "a", f"{rewards_module}:half_nan", epochs=1)
    assert records(partial.run_dir, "train")[-1]["invalid_rewards"] > 0
    assert partial.metrics["train"]["skipped_steps"] == 0
    with pytest.raises(ConfigError, match="every LoRA B matrix is zero"):  # every step skipped: nothing trained
        rl_run(tiny_llama, prompts, tmp_path / "b", f"{rewards_module}:broken", epochs=1)
    (broken,) = (tmp_path / "b").iterdir()
    assert len(records(broken, "skipped_step")) == 6


def test_rl_reward_from_a_reward_run(tiny_llama: Path, tiny_bert: Path, prompts: Path, tmp_path: Path) -> None:
    from test_preference_runs import pair_rows

    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(32))
    judge = tunesmith.train(
        model=str(tiny_bert),
        task="reward",
        method="full",
        data={"train": str(pairs), "max_length": 32},
        train={"epochs": 1, "batch_size": 8},
        output=str(tmp_path / "judge"),
    )
    result = rl_run(tiny_llama, prompts, tmp_path / "runs", str(judge.run_dir), epochs=1)
    reward = json.loads((result.run_dir / "manifest.json").read_text())["reward"]
    assert reward["kind"] == "reward run" and reward["run"] == str(judge.run_dir.resolve())


def test_unknown_reward_is_named(tiny_llama: Path, prompts: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="rl.reward: task rl needs a reward"):
        tunesmith.train(model=str(tiny_llama), task="rl", data={"train": str(prompts)}, output=str(tmp_path))
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        rl_run(tiny_llama, prompts, tmp_path, "no_such_module:f")


def test_interrupted_rl_run_resumes_exactly(
    tiny_llama: Path, prompts: Path, tmp_path: Path, rewards_module: str
) -> None:
    want, got = interrupt_and_resume(
        tmp_path,
        5,
        model=str(tiny_llama),
        task="rl",
        method="lora",
        rl={"reward": f"{rewards_module}:letters", "group_size": 4, "max_new_tokens": 8},
        data={"train": str(prompts), "validation": 0.25, "max_length": 32},
        eval={"baseline": True},
        train={"epochs": 2, "batch_size": 3, "lr": 2e-2, "precision": "fp32", "save_every": 2},
    ).weights
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_data_pairs_ranks_sampled_completions(
    tiny_llama: Path, prompts: Path, tmp_path: Path, rewards_module: str, monkeypatch, capsys
) -> None:
    from conftest import run_cli

    out = tmp_path / "pairs.jsonl"
    code, _, err = run_cli(
        monkeypatch,
        capsys,
        "data",
        "pairs",
        str(prompts),
        "-o",
        str(out),
        "--policy",
        str(tiny_llama),
        "--reward",
        f"{rewards_module}:letters",
        "--samples",
        "4",
        "--max-new-tokens",
        "8",
    )
    assert code == 0 and "pairs from 24 prompts" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows and all(r["chosen_score"] > r["rejected_score"] and r["chosen"] != r["rejected"] for r in rows)
    from tunesmith.data.preferences import to_preference_examples
    from tunesmith.data.readers import read_rows

    assert len(to_preference_examples(read_rows(out))) == len(rows)  # ready for reward or dpo training


def test_kl_to_base_is_positive_after_tuning(
    tiny_llama: Path, prompts: Path, tmp_path: Path, rewards_module: str
) -> None:
    from tunesmith.inference import load_trained
    from tunesmith.inference.drift import kl_to_base, sample
    from tunesmith.models.generate import Sampling

    result = rl_run(tiny_llama, prompts, tmp_path, f"{rewards_module}:letters", epochs=2)
    trained = load_trained(result.run_dir)
    texts = [f"review movie {i}" for i in range(4)]
    ids, completions, _ = sample(trained, texts, Sampling(8, 1.0, 1.0, 0), from_base=True)
    assert kl_to_base(trained, ids, completions) > 0  # the tuned model differs from its base here
    assert result.metrics["baseline"]["validation"]["kl"] == pytest.approx(0.0, abs=1e-6)  # before tuning
