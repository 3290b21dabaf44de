"""One run in two processes (`tunesmith train --nproc 2`, gloo on the CPU), data parallel (DDP) and
sharded (FSDP), against one process with the same global batch: the same weights, one run
directory, an exact resume with the same N."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import tunesmith
from conftest import final_weights, make_tiny_bert, run_tunesmith, sentiment_rows, write_jsonl
from tunesmith.runs import open_run
from tunesmith.training.distributed import Processes, rank_share


def test_rank_share_deals_micro_batches_round_robin_without_overlap() -> None:
    group = [[0, 1], [2, 3], [4, 5], [6, 7], [8]]
    shares = [rank_share(group, rank, 2) for rank in range(2)]
    counted = [ids for share in shares for ids, counts in share if counts]
    assert sorted(map(tuple, counted)) == sorted(map(tuple, group))  # every micro-batch once
    assert shares[0] == [([0, 1], True), ([4, 5], True), ([8], True)]
    # the short rank runs a zero-weighted stand-in, so both run three passes
    assert shares[1] == [([2, 3], True), ([6, 7], True), ([0, 1], False)]


def test_rank_share_of_a_tail_smaller_than_the_processes() -> None:
    assert rank_share([[5, 6]], 0, 3) == [([5, 6], True)]
    assert rank_share([[5, 6]], 2, 3) == [([5, 6], False)]


class _RecordingAccelerator:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def wait_for_everyone(self) -> None:
        self.calls.append("wait")

    def end_training(self) -> None:
        self.calls.append("end")


def test_a_finished_run_waits_for_every_rank_then_leaves_the_process_group() -> None:
    """Left to interpreter exit, gloo's threads can die joinable: status 250 after a run that succeeded."""
    two, one = _RecordingAccelerator(), _RecordingAccelerator()
    Processes(two, rank=1, world=2).finish()
    Processes(one, rank=0, world=1).finish()
    assert two.calls == ["wait", "end"]
    assert one.calls == []


@pytest.fixture(scope="module")
def bert_without_dropout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Dropout draws different masks in one process than in two; without it the runs can agree."""
    path = make_tiny_bert(tmp_path_factory.mktemp("bert") / "bert")
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return path


def _config(tmp_path: Path, bert: Path, method: str, grad_accum: int, strategy: str = "ddp", **train: object) -> dict:
    write_jsonl(tmp_path / "train.jsonl", sentiment_rows(40))
    write_jsonl(tmp_path / "val.jsonl", sentiment_rows(12, seed=1))
    return {
        "task": "classification",
        "model": {"name": str(bert), "head_dropout": 0.0},
        "method": {"name": method, **({"dropout": 0.0} if method == "lora" else {})},
        "data": {"train": str(tmp_path / "train.jsonl"), "validation": str(tmp_path / "val.jsonl"), "max_length": 32},
        "train": {
            "epochs": 1,
            "batch_size": 4,
            "grad_accum": grad_accum,
            "lr": 1e-3,
            "precision": "fp32",
            "distributed": {"strategy": strategy},
            **train,
        },
        "output": {"dir": str(tmp_path / "runs"), "name": f"{method}-{grad_accum}"},
    }


def _train_in_two(tmp_path: Path, config: dict, *extra: str) -> Path:
    path = tmp_path / f"{config['output']['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    done = run_tunesmith("train", path, "--nproc", "2", *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [p for p in (tmp_path / "runs").iterdir() if p.name.startswith(config["output"]["name"])]
    assert len(runs) == 1, runs  # one run directory, written by rank 0 alone
    return runs[0]


@pytest.mark.parametrize(("method", "strategy"), [("full", "ddp"), ("lora", "ddp"), ("full", "fsdp")])
def test_two_processes_train_the_weights_of_one_with_the_same_global_batch(
    tmp_path: Path, bert_without_dropout: Path, method: str, strategy: str
) -> None:
    # 4 rows x 2 micro-batches in one process == 4 rows x 1 micro-batch in each of 2 processes
    one = tunesmith.train(_config(tmp_path, bert_without_dropout, method, grad_accum=2, log_every=1))
    config = _config(tmp_path, bert_without_dropout, method, grad_accum=1, strategy=strategy, log_every=1)
    two = _train_in_two(tmp_path, config)

    a, b = final_weights(one.run_dir), final_weights(two)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
    plan = json.loads((two / "plan.json").read_text())
    assert plan["processes"] == 2 and plan["total_steps"] == 5  # 40 rows / (4 x 1 x 2)
    losses = [[r["loss"] for r in open_run(d).metrics() if r["kind"] == "train"] for d in (one.run_dir, two)]
    assert len(losses[1]) == 5  # one line a step, not one per process
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # the loss is the mean over both processes
    train = json.loads((two / "eval.json").read_text())["train"]
    assert train["samples"] == 40  # counted over both processes


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_resume_exactly_and_refuse_another_count(tmp_path: Path, tiny_bert: Path, strategy: str) -> None:
    # With dropout on, an exact resume needs each process's own RNG state back (and, sharded, the
    # optimizer state gathered and split again).
    config = _config(tmp_path, tiny_bert, "full", grad_accum=1, strategy=strategy, save_every=2)
    config["model"]["head_dropout"] = 0.1
    whole = _train_in_two(tmp_path, config)
    expected = final_weights(whole)

    # as if killed during step 4: the step-4 checkpoint and everything after it never written
    shutil.rmtree(whole / "final")
    (whole / "eval.json").unlink()
    for late in (whole / "checkpoints").glob("step-000000[4-9]"):
        shutil.rmtree(late)
    assert sorted(p.name for p in (whole / "checkpoints").glob("step-*")) == ["step-0000002"]
    state = torch.load(whole / "checkpoints" / "step-0000002" / "training_state.pt", weights_only=False)
    assert len(state["rng_per_process"]) == 2
    assert not torch.equal(state["rng_per_process"][0]["torch"], state["rng_per_process"][1]["torch"])

    if strategy == "ddp":  # (the check does not depend on the strategy)
        refused = run_tunesmith("train", whole / "config.yaml", "--resume", whole)
        assert refused.returncode == 2
        assert "trained in 2 process(es), not 1" in refused.stderr and "--nproc 2" in refused.stderr

    resumed = run_tunesmith("train", whole / "config.yaml", "--nproc", "2", "--resume", whole)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, tensor in final_weights(whole).items():
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


def test_a_causal_lm_sharded_over_two_processes_trains_the_weights_of_one(tmp_path: Path, tiny_llama: Path) -> None:
    # The chunked LM loss reads the output layer's weight after the forward pass: under FSDP that
    # weight must still be gathered then.
    rows = [{"prompt": f"colour of {w} {i}?", "completion": w} for i, w in enumerate(["red", "blue", "gold"] * 8)]
    config = {
        "model": str(tiny_llama),
        "task": "sft",
        "method": {"name": "lora", "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", rows)), "max_length": 48},
        "train": {"epochs": 1, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "precision": "fp32"},
        "output": {"dir": str(tmp_path / "runs"), "name": "one"},
    }
    one = tunesmith.train(config)
    config["train"] |= {"grad_accum": 1, "distributed": {"strategy": "fsdp"}}
    config["output"]["name"] = "two"
    two = _train_in_two(tmp_path, config)
    a, b = final_weights(one.run_dir), final_weights(two)
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4, msg=name)
