"""Reward models and DPO end to end on tiny models built in-process: they learn the preference,
DPO starts at log 2 with the base model as its reference (no second copy), the reference is the
base model exactly, resumes are exact, and bad pairs are named."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

import tunesmith
from conftest import FILLER, NEGATIVE, POSITIVE, build_run_model, interrupt_and_resume, run_cli, write_jsonl
from tunesmith.errors import ConfigError, DataError


def pair_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """The preferred response carries a positive word, the other a negative one."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        filler = " ".join(rng.sample(FILLER, 3))
        rows.append(
            {
                "prompt": f"review {filler}",
                "chosen": f"{rng.choice(POSITIVE)} {filler}",
                "rejected": f"{rng.choice(NEGATIVE)} {filler}",
            }
        )
    return rows


@pytest.fixture()
def pairs(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "pairs.jsonl", pair_rows(64))


def run(model: Path, task: str, data: Path, out: Path, method: object = "lora", **train: object):
    return tunesmith.train(
        model=str(model),
        task=task,
        method=method,
        data={"train": str(data), "validation": 0.125, "max_length": 64},
        train={"epochs": 3, "batch_size": 8, "lr": 5e-3, "log_every": 1, "precision": "fp32", **train},
        output=str(out),
    )


def losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"]


def test_reward_model_learns_the_preference_and_scores(
    tiny_bert: Path, pairs: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    result = run(tiny_bert, "reward", pairs, tmp_path / "runs", "full", lr=1e-3, epochs=4)
    val = result.metrics["validation"]
    assert val["count"] == 8 and val["accuracy"] >= 0.75 and val["margin"] > 0
    assert set(val) >= {"accuracy", "margin", "chosen", "rejected", "loss"}
    good, bad = tunesmith.score(result.run_dir, ["review the plot", "review the plot"], ["great plot", "awful plot"])
    assert good > bad
    code, out, _ = run_cli(
        monkeypatch, capsys, "score", str(result.run_dir), "--prompt", "review it", "--response", "superb it"
    )
    assert code == 0 and math.isfinite(float(out.split()[0]))
    assert tunesmith.evaluate(result.run_dir, pairs)["count"] == 64


def test_reward_model_on_a_decoder_pools_the_last_token(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    from tunesmith.inference import load_trained

    result = tunesmith.train(
        model={"name": str(tiny_llama), "pooling": "last"},
        task="reward",
        method="lora",
        data={"train": str(pairs), "validation": 0.125, "max_length": 64},
        train={"epochs": 2, "batch_size": 8, "lr": 5e-3, "precision": "fp32"},
        output=str(tmp_path),
    )
    trained = load_trained(result.run_dir)
    model, objective = trained.model, trained.objective
    # A short response batched with a long one is right-padded: its score must come from its own last
    # real token, not from the padding at the end of the row.
    items = objective.encode_responses(["review it"] * 2, ["good", "good and then a much longer response"])
    batch = objective.collate(items)  # (4, T): both responses as "chosen", then both as "rejected"
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short row is padded
    with torch.no_grad():
        scores = model(**objective.model_inputs(batch))[:, 0]
        states = model.backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        last = batch["attention_mask"].sum(1) - 1
        by_hand = model.head(states.last_hidden_state[torch.arange(4), last])[:, 0]
        alone = model(**objective.model_inputs(objective.collate(items[:1])))[0, 0]
    assert torch.allclose(scores, by_hand, atol=1e-5)
    assert float(scores[0]) == pytest.approx(float(alone), abs=1e-5)


@pytest.mark.parametrize("method", ["lora", "full", "ia3", "adapter"])
def test_dpo_starts_at_log_2_and_learns(tiny_llama: Path, pairs: Path, tmp_path: Path, method: str) -> None:
    result = run(tiny_llama, "dpo", pairs, tmp_path, method, warmup_ratio=0.0)
    history = losses(result.run_dir)
    assert history[0] == pytest.approx(math.log(2), abs=1e-6)  # the policy starts as the reference
    assert sum(history[-4:]) / 4 < history[0]
    val = result.metrics["validation"]
    assert set(val) >= {"accuracy", "margin", "chosen", "rejected", "logps_chosen", "logps_rejected", "loss"}


def test_dpo_reference_is_the_base_model(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    from tunesmith.inference import load_trained
    from tunesmith.runtime import Runtime

    result = run(tiny_llama, "dpo", pairs, tmp_path, "lora")
    trained = load_trained(result.run_dir)
    examples = trained.task.read_examples(str(pairs), trained.config.data)[:8]
    runtime = Runtime(torch.device("cpu"), "fp32", 4)
    switched_off = trained.objective.add_reference(trained.model, trained.objective.encode(examples), runtime)
    fresh = type(trained.objective)(trained.objective.tokenizer, 64, trained.config.section("dpo"))
    base = build_run_model(trained.config)[0]
    from_base = fresh.add_reference(base, fresh.encode(examples), runtime)
    for a, b in zip(switched_off, from_base, strict=True):
        assert a["reference"] == pytest.approx(b["reference"], abs=1e-4)
    assert tunesmith.evaluate(result.run_dir, pairs)["count"] == 64  # reference from the adapter switched off


def test_a_dpo_run_generates_as_an_sft_run_does(tiny_llama: Path, pairs: Path, tmp_path: Path, monkeypatch, capsys):
    result = run(tiny_llama, "dpo", pairs, tmp_path, "lora", epochs=1)
    sampling = tunesmith.api.Sampling(max_new_tokens=4)
    (answer,) = tunesmith.generate(result.run_dir, ["review the plot"], sampling)
    printed = run_cli(monkeypatch, capsys, "generate", result.run_dir, "review the plot", "--max-new-tokens", "4")
    assert printed.code == 0 and printed.out.strip() == answer.strip()
    refused = "predict is for runs that give a label; this dpo run gives text: use tunesmith generate or chat"
    with pytest.raises(ConfigError, match=refused):
        tunesmith.predict(result.run_dir, ["review the plot"])


def test_simpo_needs_no_reference(
    tiny_llama: Path, pairs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunesmith.tasks.dpo import DpoObjective

    seen: list[tuple[bool, bool, int]] = []  # per call: needs a reference, items got one, references kept
    add_reference = DpoObjective.add_reference

    def spy(self: DpoObjective, model, items, runtime):  # type: ignore[no-untyped-def]
        out = add_reference(self, model, items, runtime)
        seen.append((self.needs_reference, any("reference" in it for it in out), len(self.reference)))
        return out

    monkeypatch.setattr(DpoObjective, "add_reference", spy)
    result = tunesmith.train(
        model=str(tiny_llama),
        task="dpo",
        method="lora",
        dpo={"loss_type": "simpo", "beta": 2.0},
        data={"train": str(pairs), "validation": 0.125, "max_length": 64},
        train={"epochs": 3, "batch_size": 8, "lr": 5e-3, "log_every": 1, "precision": "fp32"},
        output=str(tmp_path),
    )
    assert seen and all(call == (False, False, 0) for call in seen)  # no reference pass was run
    history = losses(result.run_dir)
    assert history[0] != pytest.approx(math.log(2), abs=1e-3)  # SimPO does not start at DPO's log 2
    assert sum(history[-4:]) / 4 < history[0]


def test_interrupted_dpo_resumes_exactly(tiny_llama: Path, pairs: Path, tmp_path: Path) -> None:
    want, got = interrupt_and_resume(
        tmp_path,
        5,
        model=str(tiny_llama),
        task="dpo",
        method="lora",
        data={"train": str(pairs), "validation": 0.125, "max_length": 64},
        train={"epochs": 3, "batch_size": 8, "lr": 5e-3, "precision": "fp32", "save_every": 2},
    ).weights
    for name in want:
        assert torch.equal(want[name], got[name]), name


def test_bad_pairs_and_methods_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    rows = [*pair_rows(4), {"prompt": "p", "chosen": "same", "rejected": "same"}]
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl:5: chosen and rejected are the same response"):
        run(tiny_llama, "dpo", bad, tmp_path / "r")
    good = write_jsonl(tmp_path / "good.jsonl", pair_rows(8))
    with pytest.raises(ConfigError, match="trains only a new head"):
        run(tiny_llama, "dpo", good, tmp_path / "r", "feature-extraction")


def test_data_check_finds_duplicate_and_reversed_pairs(tmp_path: Path, monkeypatch, capsys) -> None:
    rows = pair_rows(10)
    rows += [rows[0], {"prompt": rows[1]["prompt"], "chosen": rows[1]["rejected"], "rejected": rows[1]["chosen"]}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", str(path), "--task", "dpo", "--json")
    report = json.loads(out)
    counts = {f["name"]: f["count"] for f in report["findings"]}
    assert code == 1 and counts["duplicates"] == 1 and counts["conflicting"] == 1
