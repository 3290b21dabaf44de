"""Instruction tuning through the CLI and the Python API on a tiny Llama: train, generate, chat,
eval, exact resume, and the bad input a user meets (each one clear line and exit 2)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tunesmith
from conftest import interrupt_and_resume, run_cli, write_jsonl

WORDS = ["red", "blue", "green", "gold"]


def qa_rows(n: int) -> list[dict]:
    """Questions whose answer is the colour word in them: learnable by a tiny model."""
    return [{"prompt": f"colour of {WORDS[i % 4]} {i}?", "completion": WORDS[i % 4]} for i in range(n)]


@pytest.fixture()
def sft_config(tiny_llama: Path, tmp_path: Path) -> dict:
    return {
        "model": str(tiny_llama),
        "task": "sft",
        "method": "lora",
        "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", qa_rows(48))), "validation": 0.25, "max_length": 48},
        "train": {"epochs": 2, "batch_size": 8, "lr": 1e-2, "log_every": 1, "precision": "fp32"},
        "eval": {"max_new_tokens": 6, "samples": 2},
        "output": str(tmp_path / "runs"),
    }


def test_train_generate_chat_eval_through_the_cli(sft_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(sft_config))
    code, out, err = run_cli(monkeypatch, capsys, "train", config)
    out += err
    assert code == 0, out
    (run_dir,) = (tmp_path / "runs").iterdir()
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert {"loss", "perplexity", "exact_match", "answered"} <= metrics["validation"].keys()
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [m for m in logged if m["kind"] == "samples"]
    assert samples and len(samples[-1]["samples"]) == 2  # generations logged beside the metrics
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["template"] == "chat" and plan["rows_encoded"]["train"]["kept"] == 36

    code, out, err = run_cli(monkeypatch, capsys, "generate", run_dir, "colour of red 5?", "--max-new-tokens", "4")

    out += err
    assert code == 0, out
    expected = tunesmith.api.generate(run_dir, ["colour of red 5?"], tunesmith.api.Sampling(max_new_tokens=4))[0]
    assert out.strip() == expected.strip()  # the streamed text is the whole answer

    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\ncolour of blue 1?\n/exit\n"))
    code, out, err = run_cli(monkeypatch, capsys, "chat", run_dir, "--max-new-tokens", "3", "--temperature", "0")
    out += err
    assert code == 0, out
    assert out.count("model> ") == 2

    held_out = write_jsonl(tmp_path / "held.jsonl", qa_rows(8))
    code, out, err = run_cli(monkeypatch, capsys, "eval", run_dir, "--data", held_out, "--json")
    out += err
    assert code == 0, out
    result = json.loads(out[out.index("{") :])
    assert result["answered"] == 8 and 0.0 <= result["exact_match"] <= 1.0
    written = [json.loads(line) for line in Path(result["generations"]).read_text().splitlines()]
    assert len(written) == 8 and {"prompt", "reference", "output", "match"} <= written[0].keys()

    code, out, err = run_cli(monkeypatch, capsys, "generate", run_dir, "--data", held_out, "--max-new-tokens", "2")

    out += err
    assert code == 0, out
    assert len([line for line in out.splitlines() if line.startswith("{")]) == 8


def test_a_tiny_model_learns_the_answers(sft_config: dict) -> None:
    # `full`: a tiny random model's output layer is too weak for an adapter alone to sharpen it.
    sft_config.update(method="full")
    sft_config["train"].update(epochs=12, lr=1e-2)
    sft_config["eval"]["baseline"] = True
    result = tunesmith.train(**sft_config)
    before, after = result.metrics["baseline"]["validation"], result.metrics["validation"]
    assert after["loss"] < before["loss"] - 1.0
    assert after["exact_match"] > before["exact_match"]


@pytest.mark.parametrize("packing", [False, True])
def test_resumed_sft_run_ends_with_the_same_weights(sft_config: dict, tmp_path: Path, packing: bool) -> None:
    sft_config["data"]["packing"] = packing
    sft_config["train"]["save_every"] = 2
    cfg = {k: v for k, v in sft_config.items() if k != "output"}
    expected, got = interrupt_and_resume(tmp_path, 5, **cfg).weights
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_packing_trains_fewer_longer_sequences(sft_config: dict) -> None:
    sft_config["data"].update(packing=True, max_length=200)  # rows are ~45 byte tokens
    result = tunesmith.train(**sft_config)
    plan = json.loads((result.run_dir / "plan.json").read_text())
    counts = plan["rows_encoded"]["train"]
    assert counts["packed_sequences"] < counts["kept"] / 2


BAD = {
    "unknown role": ({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}, "tool"),
    "no assistant": ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
    "empty completion": ({"prompt": "hi", "completion": "  "}, "empty"),
    "no format": ({"question": "hi"}, "prompt"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_rows_get_one_line_naming_the_row(case: str, sft_config: dict, tmp_path: Path, monkeypatch, capsys):
    row, expected = BAD[case]
    data = write_jsonl(tmp_path / "bad.jsonl", [*qa_rows(3), row])
    sft_config["data"]["train"] = str(data)
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(sft_config))
    code, out, err = run_cli(monkeypatch, capsys, "train", config)
    out += err
    assert code == 2
    assert "bad.jsonl:4" in out and expected in out and "Traceback" not in out


def test_overlong_rows_follow_the_policy(sft_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    rows = [*qa_rows(16), {"prompt": "x" * 80, "completion": "red"}]
    sft_config["data"].update(train=str(write_jsonl(tmp_path / "long.jsonl", rows)), validation=None, overlong="drop")
    result = tunesmith.train(**sft_config)
    counts = json.loads((result.run_dir / "plan.json").read_text())["rows_encoded"]["train"]
    assert counts["dropped_overlong"] == 1 and counts["kept"] == 16

    sft_config["data"]["overlong"] = "error"
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(sft_config))
    code, out, err = run_cli(monkeypatch, capsys, "train", config)
    out += err
    assert code == 2 and "long.jsonl:17" in out and "max_length" in out


def test_tokenizer_without_pad_token_pads_with_eos(sft_config: dict, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    model_dir = tmp_path / "nopad"
    import shutil

    shutil.copytree(sft_config["model"], model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = None
    tok.save_pretrained(model_dir)
    assert AutoTokenizer.from_pretrained(model_dir).pad_token is None
    sft_config.update(model=str(model_dir))
    sft_config["train"]["max_steps"] = 2
    result = tunesmith.train(**sft_config)
    assert result.metrics["train"]["steps"] == 2


def test_generate_refuses_a_classification_run(base_config: dict, monkeypatch, capsys) -> None:
    result = tunesmith.train(**{**base_config, "train": {**base_config["train"], "max_steps": 1}})
    code, out, err = run_cli(monkeypatch, capsys, "generate", result.run_dir, "hello")
    out += err
    assert code == 2 and "a classification run gives a label, not text; use tunesmith predict" in out


@pytest.mark.parametrize("method", ["full", "partial", "lora", "adapter", "ia3", "prompt-tuning", "prefix-tuning"])
def test_every_method_trains_a_causal_lm_and_its_run_generates(method: str, sft_config: dict) -> None:
    sft_config.update(method=method)
    sft_config["train"].update(max_steps=3, lr=5e-3)
    sft_config["eval"].update(samples=0, exact_match_rows=4)
    result = tunesmith.train(**sft_config)
    assert result.metrics["train"]["steps"] == 3
    assert result.metrics["validation"]["answered"] == 4
    # The run reloads from disk (config + trained weights, strictly) and generates; greedy is repeatable.
    sampling = tunesmith.api.Sampling(max_new_tokens=5)
    first = tunesmith.api.generate(result.run_dir, ["colour of gold 3?"], sampling)
    assert first == tunesmith.api.generate(result.run_dir, ["colour of gold 3?"], sampling)


def test_gradient_checkpointing_gives_the_same_training(sft_config: dict, tmp_path: Path) -> None:
    sft_config["train"].update(max_steps=3)
    sft_config["method"] = {"name": "lora", "dropout": 0.0}  # no dropout: recomputation draws no new masks
    plain = tunesmith.train(**{**sft_config, "output": str(tmp_path / "a")})
    sft_config["train"]["gradient_checkpointing"] = True
    checkpointed = tunesmith.train(**{**sft_config, "output": str(tmp_path / "b")})
    a = load_file(str(plain.run_dir / "final" / "trainable.safetensors"))
    b = load_file(str(checkpointed.run_dir / "final" / "trainable.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.parametrize("method", ["full", "partial", "lora", "adapter", "ia3", "prompt-tuning", "prefix-tuning"])
def test_gpt2_family_with_conv1d_linears_and_no_chat_template(method: str, sft_config: dict, tiny_gpt2: Path) -> None:
    sft_config.update(model=str(tiny_gpt2), method=method)
    sft_config["data"]["packing"] = method not in ("prompt-tuning", "prefix-tuning")
    sft_config["train"].update(max_steps=2, lr=5e-3)
    sft_config["eval"].update(samples=1, exact_match_rows=2)
    result = tunesmith.train(**sft_config)
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["template"] == "plain"  # prompt rows are plain text for a tokenizer without a template
    assert plan["trainable_parameters"] > 0
    assert isinstance(tunesmith.api.generate(result.run_dir, ["colour of red 1?"])[0], str)


def test_a_model_peft_cannot_wrap_gets_a_clear_error(sft_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    import peft

    def refuse(model, config, *args, **kwargs):
        raise ValueError("Prompt learning is not supported for this model type")

    monkeypatch.setattr(peft, "get_peft_model", refuse)  # stands in for an architecture peft rejects
    sft_config.update(method="prompt-tuning")
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(sft_config))
    code, out, err = run_cli(monkeypatch, capsys, "train", config)
    out += err
    assert code == 2 and "Traceback" not in out
    assert "method.name=prompt-tuning: peft cannot wrap" in out and "choose lora, adapter or ia3" in out
