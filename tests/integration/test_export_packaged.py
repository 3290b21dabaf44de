"""`tunesmith export` through the real CLI on the packaged models, a few training steps each; every
export loads in a fresh Python with transformers / peft alone and gives the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_tunesmith
from export_files import load_elsewhere

pytestmark = pytest.mark.slow


def train(tmp_path: Path, config: str, *overrides: str) -> Path:
    done = run_tunesmith("train", f"configs/{config}", *overrides, "eval.baseline=false", f"output.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = tmp_path.iterdir()
    return run_dir


def export(run_dir: Path, fmt: str, out: Path) -> str:
    done = run_tunesmith("export", run_dir, "--format", fmt, "-o", out)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_minilm_lora_exports_to_transformers_and_peft(tmp_path: Path) -> None:
    quick = ["data.limit=96", "data.validation=0.02", "train.max_steps=3", "train.batch_size=16"]
    run_dir = train(tmp_path / "runs", "classify-lora.yaml", *quick)
    printed = export(run_dir, "hf", tmp_path / "hf")
    assert "same argmax 100.0%" in " ".join(printed.split())
    seen = load_elsewhere(tmp_path / "hf", "hf-text", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]
    export(run_dir, "peft", tmp_path / "peft")
    seen = load_elsewhere(tmp_path / "peft", "peft-text", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]
    card = (tmp_path / "peft" / "README.md").read_text()
    assert "minilm-l6" in card and "rotten-tomatoes" in card


def test_efficientnet_lite0_exports_with_its_network_file(tmp_path: Path) -> None:
    quick = ["data.limit=64", "train.max_steps=2", "train.batch_size=16", "data.image_size=32"]
    run_dir = train(tmp_path / "runs", "image-full.yaml", *quick)
    export(run_dir, "hf", tmp_path / "hf")
    seen = load_elsewhere(tmp_path / "hf", "hf-image", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]


def test_whisper_transcription_exports_to_stock_whisper(tmp_path: Path) -> None:
    quick = ["train.max_steps=2", "train.batch_size=8", "data.limit=16"]
    run_dir = train(tmp_path / "runs", "speech-transcription.yaml", *quick)
    export(run_dir, "hf", tmp_path / "hf")
    facts = json.loads((tmp_path / "hf" / "export.json").read_text())
    assert facts["export"]["parity"]["greedy_generations_identical"] is True
    seen = load_elsewhere(tmp_path / "hf", "hf-whisper", tmp_path)
    assert seen["max_diff"] < 1e-3 and seen["same_argmax"]
