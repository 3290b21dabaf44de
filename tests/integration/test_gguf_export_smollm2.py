"""The real CLI tunes the packaged SmolLM2-135M-Instruct with LoRA for a few steps and exports it as a
q8_0 GGUF: parity with the trained model holds, and the file carries SmolLM2's tokenizer and chat format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_tunesmith

pytestmark = pytest.mark.slow


def test_a_smollm2_lora_run_exports_to_q8_0_gguf(tmp_path: Path) -> None:
    quick = [
        "data.limit=16",
        "data.validation=0.001",  # ~12 held-out questions
        "train.max_steps=1",
        "train.precision=fp32",  # bf16 is emulated, and slow, on CPUs without it
        "eval.baseline=false",
        "eval.exact_match_rows=2",
        "eval.samples=0",
        f"output.dir={tmp_path / 'runs'}",
    ]
    done = run_tunesmith("train", "configs/sft-lora.yaml", *quick)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    out = tmp_path / "gguf"
    done = run_tunesmith("export", run_dir, "--format", "gguf", "--quantize", "q8_0", "-o", out, "--rows", "2")
    assert done.returncode == 0, done.stderr
    facts = json.loads((out / "export.json").read_text())["export"]
    parity = facts["parity"]
    assert parity["greedy_generations_identical"] and parity["same_argmax"] == 1.0
    assert parity["max_abs_logit_diff"] <= parity["tolerance"]
    assert facts["tied_embeddings"] and facts["chat_format"] == "chatml" and facts["tensor_types"]["Q8_0"] == 211
    assert 140e6 < (out / "model.gguf").stat().st_size < 200e6  # 135M weights at ~8.5 bits
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./model.gguf" in modelfile and "SYSTEM" in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
