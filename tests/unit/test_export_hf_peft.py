"""Exports to plain transformers and plain peft, on tiny runs: each loads in a fresh process that never
imports tunesmith and computes what the trained model computed (logits and greedy generations); the
model card states the parity; runs a format cannot hold are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunesmith
from conftest import run_cli, write_jsonl
from export_files import load_elsewhere
from tunesmith.exports.parity import ParityError

WORDS = ["red", "blue", "green", "gold"]


def qa_rows(n: int) -> list[dict]:
    return [{"prompt": f"colour of {WORDS[i % 4]} {i}?", "completion": WORDS[i % 4]} for i in range(n)]


def sft_run(tiny_llama: Path, tmp_path: Path, method: object, epochs: int = 2) -> Path:
    result = tunesmith.train(
        model=str(tiny_llama),
        task="sft",
        method=method,
        data={"train": str(write_jsonl(tmp_path / "qa.jsonl", qa_rows(32))), "validation": 0.25, "max_length": 48},
        train={"epochs": epochs, "batch_size": 8, "lr": 1e-2, "precision": "fp32"},
        eval={"samples": 0},
        output={"dir": str(tmp_path / "runs")},
    )
    return result.run_dir


def classifier_run(base_config: dict, method: object) -> Path:
    config = {**base_config, "method": method, "train": {**base_config.get("train", {}), "epochs": 2}}
    return tunesmith.train(config).run_dir


@pytest.mark.parametrize("method", ["lora", "full", "ia3"])
def test_a_causal_lm_exports_to_plain_transformers(tiny_llama: Path, tmp_path: Path, method: str) -> None:
    run = sft_run(tiny_llama, tmp_path, method)
    done = tunesmith.export(run, "hf", tmp_path / "hf", rows=4)
    assert done.parity.ok and done.parity.generations_equal and done.parity.rows == 4
    seen = load_elsewhere(tmp_path / "hf", "hf-lm", tmp_path)
    assert seen["max_diff"] < 1e-3 and seen["same_argmax"] and seen["generations_equal"]
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    # Tied input/output embeddings stay one tensor after reload.
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    assert (tmp_path / "hf" / "tokenizer_config.json").is_file() and (
        tmp_path / "hf" / "generation_config.json"
    ).is_file()
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "Parity with the trained model" in card and f"**{method}**" in card and "sha256" in card


@pytest.mark.parametrize("method", ["lora", "ia3", "prompt-tuning", "prefix-tuning"])
def test_a_causal_lm_adapter_exports_to_plain_peft(tiny_llama: Path, tmp_path: Path, method: str) -> None:
    run = sft_run(tiny_llama, tmp_path, method, epochs=3 if method.endswith("tuning") else 2)
    done = tunesmith.export(run, "peft", tmp_path / "adapter", rows=4)
    assert done.parity.ok and done.parity.generations_equal
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(tiny_llama)
    from safetensors.torch import load_file

    keys = list(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    if not method.endswith("tuning"):  # peft's own names for the full model's modules
        assert all(k.startswith("base_model.model.model.layers.") for k in keys), keys[:3]
    seen = load_elsewhere(tmp_path / "adapter", "peft-lm", tmp_path)
    assert seen["max_diff"] < 1e-3 and seen["same_argmax"] and seen["generations_equal"]


def test_a_text_classifier_exports_to_transformers_and_peft(base_config: dict, tmp_path: Path) -> None:
    run = classifier_run(base_config, "lora")
    hf = tunesmith.export(run, "hf", tmp_path / "hf")
    assert hf.parity.ok and hf.parity.labels_equal == 1.0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForSequenceClassification"] == "modeling_tunesmith.TunesmithClassifier"
    assert set(config["id2label"].values()) == {"negative", "positive"}
    seen = load_elsewhere(tmp_path / "hf", "hf-text", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]
    adapter = tunesmith.export(run, "peft", tmp_path / "adapter")
    assert adapter.parity.ok
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["head"] and config["base_model_name_or_path"] == "base"
    seen = load_elsewhere(tmp_path / "adapter", "peft-text", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]


def test_formats_that_do_not_fit_are_refused_in_one_line(
    base_config: dict, tiny_llama: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    full = classifier_run(base_config, "full")
    capsys.readouterr()  # what training printed
    result = run_cli(monkeypatch, capsys, "export", full, "--format", "peft", "-o", tmp_path / "x")
    assert result.code == 2 and "trains no peft adapter; export it with --format hf" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    adapter = classifier_run(base_config, "adapter")
    capsys.readouterr()
    result = run_cli(monkeypatch, capsys, "export", adapter, "--format", "hf", "-o", tmp_path / "x")
    assert result.code == 2 and "--format onnx" in result.err
    prompt = sft_run(tiny_llama, tmp_path, "prompt-tuning")
    capsys.readouterr()
    result = run_cli(monkeypatch, capsys, "export", prompt, "--format", "hf", "-o", tmp_path / "x")
    assert result.code == 2 and "--format peft" in result.err
    result = run_cli(monkeypatch, capsys, "export", prompt, "--format", "tflite", "-o", tmp_path / "x")
    assert result.code == 2 and "use one of hf, peft, onnx, gguf" in result.err
    result = run_cli(
        monkeypatch, capsys, "export", prompt, "--format", "hf", "--quantize", "int8", "-o", tmp_path / "x"
    )
    assert result.code == 2 and "--format hf takes no --quantize" in result.err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = run_cli(monkeypatch, capsys, "export", full, "--format", "hf", "-o", tmp_path / "taken")
    assert result.code == 2 and "not empty" in result.err


def test_a_failed_parity_check_writes_nothing_and_says_by_how_much(base_config: dict, tmp_path: Path, monkeypatch):
    run = classifier_run(base_config, "lora")
    import tunesmith.exports.hf as hf

    monkeypatch.setattr(hf, "TOLERANCE", -1.0)  # nothing can pass
    with pytest.raises(ParityError, match=r"max \|logit difference\| .* \(tolerance -1\)"):
        tunesmith.export(run, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.partial-*"))


def test_the_cli_exports_and_reports_parity(base_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    run = classifier_run(base_config, "full")
    capsys.readouterr()
    result = run_cli(monkeypatch, capsys, "export", run, "--format", "hf", "-o", tmp_path / "hf", "--rows", "5")
    assert result.code == 0, result.err
    assert "exported hf" in result.text and "over 5 rows" in result.text and "same argmax 100.0%" in result.text
    facts = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert facts["export"]["parity"]["rows"] == 5 and facts["base_model"]["sha256"]
    assert facts["metrics"]["after"]["validation"]["accuracy"] >= 0
    from safetensors.torch import load_file

    assert load_file(tmp_path / "hf" / "probe.safetensors")["logits"].shape == (5, 2)
