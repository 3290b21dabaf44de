"""ONNX export of tiny runs built in-process: text classifiers (LoRA and full), a causal LM, image and
audio classifiers and a speech-to-text model are exported, loaded back in a fresh process that imports
only onnxruntime and numpy, and give the trained model's logits, at the probe's shapes and at other
batch and sequence sizes (dynamic axes); int8 reports what quantization changed; prompt tuning is
refused in one line; an export that does not match writes nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

import tunesmith
from conftest import make_tiny_resnet, make_tiny_vit, sentiment_rows, write_halves_npz, write_jsonl
from tunesmith.errors import ConfigError
from tunesmith.exports import export_run
from tunesmith.exports.onnx import FP32_TOLERANCE
from tunesmith.exports.parity import ParityError, make_probe, model_logits
from tunesmith.inference import load_trained

RATE = 16000
FAST = {"batch_size": 8, "lr": 5e-3, "log_every": 2, "precision": "fp32"}

# Run in a fresh interpreter: load model.onnx with onnxruntime and run it on each feed of an .npz file
# ("<feed>/<input>" arrays), proving that the export needs neither tunesmith nor torch.
_ORT_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort

model, feeds, out = sys.argv[1:4]
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
arrays = np.load(feeds)
count = len({key.split("/")[0] for key in arrays.files})
results = {
    str(i): session.run(["logits"], {k.split("/", 1)[1]: arrays[k] for k in arrays.files if k.startswith(f"{i}/")})[0]
    for i in range(count)
}
np.savez(out, **results)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("tunesmith", "torch"))
print(json.dumps({
    "leaked": leaked,
    "inputs": {i.name: i.shape for i in session.get_inputs()},
    "metadata": session.get_modelmeta().custom_metadata_map,
}))
"""


def onnxruntime_logits(model: Path, feeds: list[dict[str, torch.Tensor]], tmp_path: Path) -> tuple[list, dict]:
    """`model`'s logits on each feed, computed by plain onnxruntime in a fresh process, and what that
    process saw of the graph (input shapes, metadata)."""
    arrays = {f"{i}/{name}": t.numpy() for i, feed in enumerate(feeds) for name, t in feed.items()}
    np.savez(tmp_path / "feeds.npz", **arrays)
    done = subprocess.run(
        [sys.executable, "-c", _ORT_SCRIPT, str(model), str(tmp_path / "feeds.npz"), str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["leaked"] == [], f"onnxruntime alone should run the export, not {seen['leaked']}"
    outputs = np.load(tmp_path / "out.npz")
    return [outputs[str(i)] for i in range(len(feeds))], seen


def smaller(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The two shortest rows of a probe batch, their token inputs cut to those rows' length: other batch
    and sequence sizes than the graph was traced on."""
    ids = next((k for k in ("input_ids", "decoder_input_ids") if k in inputs), None)
    if ids is None:
        return {k: v[:2] for k, v in inputs.items()}
    prefix = ids.removesuffix("input_ids")
    mask = inputs[f"{prefix}attention_mask"]
    rows = mask.sum(1).argsort(stable=True)[:2]
    width = int(mask[rows].sum(1).max())
    assert width < mask.shape[1], "the probe's rows all have one length: no other sequence length to try"
    tokens = {k for k, v in inputs.items() if k.startswith(prefix) and v.ndim == 2 and v.shape[1] == mask.shape[1]}
    return {k: v[rows, :width] if k in tokens else v[rows] for k, v in inputs.items()}


def assert_matches_trained(run_dir: Path, out: Path, tmp_path: Path) -> dict:
    """The exported graph, run by onnxruntime alone, gives what the trained run gives (reloaded, its
    method not merged) on the probe and on a smaller batch; returns what the fresh process saw."""
    trained = load_trained(run_dir)
    probe = make_probe(trained)
    feeds = [probe.inputs, smaller(probe.inputs)]
    with torch.no_grad():
        expected = [model_logits(trained.model, feed) for feed in feeds]
    got, seen = onnxruntime_logits(out / "model.onnx", feeds, tmp_path)
    for feed, want, have in zip(feeds, expected, got, strict=True):
        have = torch.from_numpy(have)
        assert have.shape == want.shape
        keep = _positions(feed, want)
        scale = max(1.0, float(want.abs().max()))
        assert float((have - want)[keep].abs().max()) <= FP32_TOLERANCE * scale
        assert torch.equal(have[keep].argmax(-1), want[keep].argmax(-1))
    assert seen["metadata"]["labels"] == json.dumps(trained.objective.labels)
    return seen


def _positions(feed: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
    """Which rows (B, C) or positions (B, T, V) of `logits` hold real tokens."""
    if logits.ndim == 2:
        return torch.ones(logits.shape[0], dtype=torch.bool)
    return feed.get("decoder_attention_mask", feed.get("attention_mask")).bool()  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def sentiment(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", sentiment_rows(96))


def classification_run(tiny_bert: Path, sentiment: Path, out: Path, method: str) -> Path:
    result = tunesmith.train(
        model=str(tiny_bert),
        method=method,
        data={"train": str(sentiment), "validation": 0.25, "max_length": 16},
        train={"epochs": 2, **FAST},
        output=str(out),
    )
    return result.run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_bert: Path, sentiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classification_run(tiny_bert, sentiment, tmp_path_factory.mktemp("runs"), "lora")


@pytest.fixture(scope="module")
def full_run(tiny_bert: Path, sentiment: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return classification_run(tiny_bert, sentiment, tmp_path_factory.mktemp("runs"), "full")


# A probe of one row is traced on that row twice (torch.export fixes an axis whose example size is 1).
@pytest.mark.parametrize(("method", "rows"), [("lora", 1), ("full", 8)])
def test_a_text_classifier_exports_and_runs_in_plain_onnxruntime(
    request: pytest.FixtureRequest, tmp_path: Path, method: str, rows: int
) -> None:
    import onnx

    run_dir = request.getfixturevalue(f"{method}_run")
    out = tmp_path / "onnx"
    done = export_run(run_dir, "onnx", out, rows=rows)
    assert done.parity.ok and done.parity.rows == rows and done.parity.max_abs_diff <= done.parity.tolerance
    assert done.path == out and done.latency_ms > 0 and done.details["model_bytes"] > 0
    assert (out / "tokenizer.json").is_file() and not (out / ".fp32").exists()  # the tokenizer goes with it
    hint = done.load_hint + "\nassert logits.shape == (1, len(labels)) == (1, 2)"
    ran = subprocess.run([sys.executable, "-c", hint], cwd=out, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0, ran.stderr  # the card's lines run as they are, in the export directory
    seen = assert_matches_trained(run_dir, out, tmp_path)  # on 8 rows, then on 2 shorter ones
    assert seen["inputs"]["input_ids"] == ["batch", "sequence"] == seen["inputs"]["attention_mask"]
    graph = onnx.load(str(out / "model.onnx")).graph
    names = {t.name for t in graph.initializer} | {n.name for n in graph.node}
    assert not any("lora" in name for name in names), "the LoRA weights should be merged, not traced"


def test_int8_quantizes_the_matmuls_and_reports_size_latency_and_the_held_out_change(
    full_run: Path, tmp_path: Path
) -> None:
    import onnx

    done = export_run(full_run, "onnx", tmp_path / "int8", quantize="int8")
    details = done.details
    assert done.quantize == "int8" and done.parity.ok and "int8" in done.parity.note
    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert details["model_bytes"] < details["fp32_model_bytes"]
    assert details["fp32_latency_ms_per_row"] > 0 and details["fp32_max_abs_logit_diff"] <= 1e-3
    # The held-out rows are the run's validation split; through the fp32 graph they score exactly what
    # the trained model scored on them at the end of training.
    evaluated = json.loads((full_run / "eval.json").read_text())["validation"]
    fp32, int8 = details["held_out_fp32"], details["held_out_int8"]
    assert details["held_out"].startswith("24 rows of ") and fp32["count"] == int8["count"] == 24
    assert fp32["accuracy"] == pytest.approx(evaluated["accuracy"])
    assert fp32["loss"] == pytest.approx(evaluated["loss"], rel=1e-4)
    assert details["held_out_change"]["accuracy"] == pytest.approx(int8["accuracy"] - fp32["accuracy"])
    assert details["held_out_same_label"] >= 0.9  # int8 keeps (nearly) every held-out label
    assert not (tmp_path / "int8" / ".fp32").exists()


def test_a_causal_lm_exports_its_token_logits_and_generates_greedily_as_trained(
    tiny_llama: Path, tmp_path: Path
) -> None:
    rows = [{"prompt": f"colour of {w} {i}?", "completion": w} for i, w in enumerate(["red", "blue", "gold"] * 12)]
    result = tunesmith.train(
        model=str(tiny_llama),
        task="sft",
        method="lora",
        data={"train": str(write_jsonl(tmp_path / "qa.jsonl", rows)), "validation": 0.25, "max_length": 48},
        train={"epochs": 1, **FAST, "lr": 1e-2},
        eval={"max_new_tokens": 4, "samples": 0},
        output=str(tmp_path / "runs"),
    )
    done = export_run(result.run_dir, "onnx", tmp_path / "onnx")
    assert done.parity.ok and done.parity.generations_equal is True
    seen = assert_matches_trained(result.run_dir, tmp_path / "onnx", tmp_path)
    assert seen["inputs"]["input_ids"] == ["batch", "sequence"]


@pytest.mark.parametrize(("backbone", "method"), [("vit", "lora"), ("resnet", "full"), ("efficientnet-lite0", "full")])
def test_an_image_classifier_exports_and_runs_in_plain_onnxruntime(tmp_path: Path, backbone: str, method: str) -> None:
    built = {"vit": make_tiny_vit, "resnet": make_tiny_resnet}
    # The hand-written EfficientNet-Lite0, randomly initialised: its own modules traced, at 32 px.
    model = str(built[backbone](tmp_path / "model")) if backbone in built else {"name": backbone, "pretrained": False}
    side = 16 if backbone in built else 32
    result = tunesmith.train(
        model=model,
        task="image-classification",
        method=method,
        data={"train": str(write_halves_npz(tmp_path / "halves.npz")), "validation": 0.25, "image_size": side},
        train={"epochs": 1, **FAST},
        output=str(tmp_path / "runs"),
    )
    done = export_run(result.run_dir, "onnx", tmp_path / "onnx")
    assert done.parity.ok
    seen = assert_matches_trained(result.run_dir, tmp_path / "onnx", tmp_path)
    assert seen["inputs"]["pixel_values"] == ["batch", 3, side, side]


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tunesmith.models.whisper_ct2 import convert_ct2_whisper
    from whisper_files import make_tiny_whisper, write_ct2_whisper

    root = tmp_path_factory.mktemp("whisper")
    return convert_ct2_whisper(write_ct2_whisper(root / "ct2", make_tiny_whisper(source=50)), root=root / "cache")


def write_tones(root: Path, n: int = 8) -> Path:
    """`root/low|high/<i>.wav`: 0.3-0.4 s of low (250 Hz) or high (2.5 kHz) tone, and transcripts of
    them in `root/train.jsonl` and `root/validation.jsonl` (every fourth clip): low tones say "hello
    there", high ones "the"."""
    rows: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    for i in range(n):
        for label, freq, words in (("low", 250.0, "hello there"), ("high", 2500.0, "the")):
            t = np.arange(int((0.3 + 0.05 * (i % 3)) * RATE)) / RATE
            wave = 0.5 * np.sin(2 * np.pi * freq * (1 + i / 20) * t)
            (root / label).mkdir(parents=True, exist_ok=True)
            soundfile.write(root / label / f"{i}.wav", wave.astype(np.float32), RATE)
            rows["validation" if i % 4 == 3 else "train"].append({"audio": f"{label}/{i}.wav", "text": words})
    for split, split_rows in rows.items():
        write_jsonl(root / f"{split}.jsonl", split_rows)
    return root


def test_an_audio_classifier_exports_and_runs_in_plain_onnxruntime(tiny_whisper: Path, tmp_path: Path) -> None:
    tones = write_tones(tmp_path / "tones")
    result = tunesmith.train(
        model=str(tiny_whisper),
        task="audio-classification",
        method="lora",
        data={"train": str(tones), "validation": 0.25},
        train={"epochs": 1, **FAST},
        output=str(tmp_path / "runs"),
    )
    done = export_run(result.run_dir, "onnx", tmp_path / "onnx")
    assert done.parity.ok and (tmp_path / "onnx" / "preprocessor_config.json").is_file()
    seen = assert_matches_trained(result.run_dir, tmp_path / "onnx", tmp_path)
    assert seen["inputs"]["input_features"][0] == "batch" and seen["inputs"]["frames"] == ["batch"]


def test_a_speech_to_text_model_exports_its_teacher_forced_decoder_logits(tiny_whisper: Path, tmp_path: Path) -> None:
    tones = write_tones(tmp_path / "tones")
    result = tunesmith.train(
        model=str(tiny_whisper),
        task="transcription",
        method="lora",
        data={"train": str(tones / "train.jsonl"), "validation": str(tones / "validation.jsonl")},
        train={"epochs": 1, **FAST},
        eval={"max_new_tokens": 4},
        output=str(tmp_path / "runs"),
    )
    done = export_run(result.run_dir, "onnx", tmp_path / "onnx")
    assert done.parity.ok and (tmp_path / "onnx" / "tokenizer.json").is_file()
    seen = assert_matches_trained(result.run_dir, tmp_path / "onnx", tmp_path)
    assert seen["inputs"]["decoder_input_ids"] == ["batch", "decoder_sequence"]


def test_prompt_tuning_is_refused_in_one_line(tiny_bert: Path, sentiment: Path, tmp_path: Path) -> None:
    run_dir = classification_run(tiny_bert, sentiment, tmp_path / "runs", "prompt-tuning")
    with pytest.raises(ConfigError) as caught:
        export_run(run_dir, "onnx", tmp_path / "onnx")
    message = str(caught.value)
    assert "\n" not in message and "prompt-tuning" in message and "--format peft" in message
    assert not (tmp_path / "onnx").exists()


def test_an_export_that_does_not_match_fails_and_writes_nothing(
    lora_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunesmith.methods.lora import LoraMethod

    merge = LoraMethod.merge

    def bad_merge(self: LoraMethod, model: torch.nn.Module) -> None:  # a merge that gets the head wrong
        merge(self, model)
        with torch.no_grad():
            model.head.weight.mul_(1.05)

    monkeypatch.setattr(LoraMethod, "merge", bad_merge)
    with pytest.raises(ParityError, match=r"does not match the trained model: max \|logit difference\|"):
        export_run(lora_run, "onnx", tmp_path / "onnx")
    assert list(tmp_path.iterdir()) == []  # neither the export nor its scratch directory
