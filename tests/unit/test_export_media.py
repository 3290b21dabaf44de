"""Image, audio and transcription runs exported to plain transformers and plain peft, on tiny models:
each export loads in a fresh process without tunesmith and gives the trained model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

import tunesmith
from conftest import make_tiny_vit, write_halves_npz
from export_files import load_elsewhere
from whisper_files import make_tiny_whisper

RATE = 16000


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_vit(tmp_path_factory.mktemp("vit") / "model")


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import WhisperFeatureExtractor

    path = tmp_path_factory.mktemp("whisper") / "model"
    model = make_tiny_whisper(source=50)
    model.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=model.config.num_mel_bins).save_pretrained(path)
    return path


def clips(root: Path, n: int = 8) -> Path:
    """Low tones saying "hello" and high tones saying "the": `root/{low,high}/<i>.wav` plus
    `root/{train,validation}.jsonl` with transcripts."""
    rows: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    for i in range(n):
        for label, base, text in (("low", 250.0, "hello"), ("high", 2500.0, "the")):
            (root / label).mkdir(parents=True, exist_ok=True)
            t = np.arange(int((0.3 + 0.05 * (i % 3)) * RATE)) / RATE
            wave = 0.5 * np.sin(2 * np.pi * base * (1 + i / 20) * t)
            soundfile.write(root / label / f"{i}.wav", wave.astype(np.float32), RATE)
            rows["validation" if i % 4 == 3 else "train"].append({"audio": f"{label}/{i}.wav", "text": text})
    for split, split_rows in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return root


def train(out: Path, **config: object) -> Path:
    train = {"epochs": 2, "batch_size": 8, "lr": 1e-2, "precision": "fp32"}
    return tunesmith.train(train=train, output={"dir": str(out / "runs")}, **config).run_dir


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_vit_image_classifier_exports(tiny_vit: Path, tmp_path: Path, method: str) -> None:
    data = write_halves_npz(tmp_path / "halves.npz")
    run = train(
        tmp_path,
        model=str(tiny_vit),
        task="image-classification",
        method=method,
        data={"train": str(data), "validation": 0.25},
    )
    assert tunesmith.export(run, "hf", tmp_path / "hf").parity.ok
    seen = load_elsewhere(tmp_path / "hf", "hf-image", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]
    processor = json.loads((tmp_path / "hf" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 16, "width": 16}
    if method == "lora":
        assert tunesmith.export(run, "peft", tmp_path / "peft").parity.ok
        seen = load_elsewhere(tmp_path / "peft", "peft-image", tmp_path)
        assert seen["max_diff"] < 1e-4 and seen["same_argmax"]


def test_efficientnet_lite0_travels_as_its_own_torch_file(tmp_path: Path) -> None:
    data = write_halves_npz(tmp_path / "halves.npz", size=32)
    run = train(
        tmp_path,
        model={"name": "efficientnet-lite0", "pretrained": False},
        task="image-classification",
        method="full",
        data={"train": str(data), "validation": 0.25, "image_size": 32},
    )
    assert tunesmith.export(run, "hf", tmp_path / "hf").parity.ok
    assert (tmp_path / "hf" / "efficientnet_net.py").is_file()
    seen = load_elsewhere(tmp_path / "hf", "hf-image", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]


def test_an_audio_classifier_exports_with_its_cut_encoder(tiny_whisper: Path, tmp_path: Path) -> None:
    data = clips(tmp_path / "clips")
    run = train(
        tmp_path,
        model=str(tiny_whisper),
        task="audio-classification",
        method="lora",
        data={"train": str(data), "validation": 0.25},
    )
    done = tunesmith.export(run, "hf", tmp_path / "hf")
    assert done.parity.ok and "max_length=6400" in done.load_hint  # clips padded to 0.4 s
    seen = load_elsewhere(tmp_path / "hf", "hf-audio", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["backbone_spec"]["max_source_positions"] == 20 and config["encoder_only"]
    assert tunesmith.export(run, "peft", tmp_path / "peft").parity.ok
    seen = load_elsewhere(tmp_path / "peft", "peft-audio", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]


def test_a_transcription_run_exports_to_stock_whisper(tiny_whisper: Path, tmp_path: Path) -> None:
    data = clips(tmp_path / "clips")
    run = train(
        tmp_path,
        model=str(tiny_whisper),
        task="transcription",
        method="lora",
        data={"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl")},
        eval={"max_new_tokens": 4},
    )
    done = tunesmith.export(run, "hf", tmp_path / "hf")
    assert done.parity.ok and done.parity.generations_equal
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["WhisperForConditionalGeneration"] and config["max_source_positions"] == 20
    seen = load_elsewhere(tmp_path / "hf", "hf-whisper", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(tmp_path / "hf")
    features = extractor(np.zeros(3000, np.float32), sampling_rate=RATE, max_length=6400, padding="max_length")
    assert np.asarray(features["input_features"]).shape[-1] == 40  # what the cut encoder takes
    assert tunesmith.export(run, "peft", tmp_path / "peft").parity.ok
    seen = load_elsewhere(tmp_path / "peft", "peft-whisper", tmp_path)
    assert seen["max_diff"] < 1e-4 and seen["same_argmax"]
