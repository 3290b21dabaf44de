"""The real CLI instruction-tunes the packaged SmolLM2-135M-Instruct for a few steps, then generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_tunesmith

pytestmark = pytest.mark.slow

tunesmith = run_tunesmith


def test_sft_train_generate_eval_on_smollm2(tmp_path: Path) -> None:
    quick = [
        "data.limit=24",
        "data.validation=0.002",  # ~25 held-out questions
        "train.max_steps=3",
        "eval.baseline=false",
        "eval.exact_match_rows=8",
        "eval.samples=1",
        f"output.dir={tmp_path}",
    ]
    done = tunesmith("train", "configs/sft-lora.yaml", *quick)
    assert done.returncode == 0, done.stderr
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert metrics["train"]["steps"] == 3 and metrics["train"]["precision"] in ("bf16", "fp32")
    validation = metrics["validation"]
    assert validation["answered"] == 8 and validation["loss"] < 5.0  # an instruct model, not random (ln V = 10.8)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["base_model"]["sha256"]  # the GGUF file's own hash

    question = "Is this movie review positive or negative? Answer with one word.\n\nReview: A joyless slog."
    generated = tunesmith("generate", run_dir, question, "--max-new-tokens", "4")
    assert generated.returncode == 0, generated.stderr
    assert generated.stdout.strip()
