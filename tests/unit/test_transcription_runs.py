"""Transcription runs end to end on a tiny Whisper (written in CTranslate2's format and converted, so it
comes with Whisper's tokenizer and generation config) learning to write "hello" for low tones and "the"
for high ones: the loss covers the transcript tokens only, WER falls, a reloaded run transcribes as the
trained one did, head-only and virtual-token methods are refused, and the gate counts transcripts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from safetensors.torch import load_file

import tunesmith
from conftest import run_cli, run_objective
from tunesmith.errors import ConfigError
from tunesmith.losses.lm import IGNORE
from tunesmith.tasks.transcription import error_rates
from whisper_files import IDS, make_tiny_whisper, write_ct2_whisper

RATE = 16000
WORDS = {"low": "hello", "high": "the"}


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tunesmith.models.whisper_ct2 import convert_ct2_whisper

    root = tmp_path_factory.mktemp("whisper")
    ct2 = write_ct2_whisper(root / "ct2", make_tiny_whisper(source=50))  # 1 s of encoder positions
    return convert_ct2_whisper(ct2, root=root / "cache")


def write_spoken(root: Path, n: int = 8) -> Path:
    """`root/clips/*.wav` and `root/{train,validation}.jsonl`: low tones say "hello", high ones "the"."""
    (root / "clips").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, str]]] = {"train": [], "validation": []}
    for i in range(n):
        for kind, base in (("low", 250.0), ("high", 2500.0)):
            rng = np.random.default_rng(i * 7 + int(base))
            t = np.arange(int((0.3 + 0.05 * (i % 3)) * RATE)) / RATE
            wave = 0.5 * np.sin(2 * np.pi * base * (1 + i / 20) * t) + 0.01 * rng.standard_normal(len(t))
            name = f"clips/{kind}-{i}.wav"
            soundfile.write(root / name, wave.astype(np.float32), RATE)
            rows["validation" if i % 4 == 3 else "train"].append({"audio": name, "text": WORDS[kind]})
    for split, split_rows in rows.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in split_rows))
    return root


@pytest.fixture()
def spoken(tmp_path: Path) -> Path:
    return write_spoken(tmp_path / "spoken")


def transcription_run(model: Path, data: Path, out: Path, method: object, **train: object) -> tunesmith.api.RunResult:
    return tunesmith.train(
        model=str(model),
        task="transcription",
        method=method,
        data={"train": str(data / "train.jsonl"), "validation": str(data / "validation.jsonl")},
        # The tiny model needs a few hundred steps at a constant rate; one batch holds the 12 training clips.
        train={"epochs": 200, "batch_size": 16, "lr": 3e-3, "scheduler": "constant", "warmup_ratio": 0.0}
        | {"log_every": 50, "eval_every": 1000, **train},
        eval={"max_new_tokens": 4, "baseline": True},
        output={"dir": str(out)},
    )


def test_the_loss_covers_the_transcript_tokens_only(tiny_whisper: Path, spoken: Path) -> None:
    from tunesmith.config import load_config
    from tunesmith.data.load import read_audio_examples

    cfg = load_config(
        {"model": str(tiny_whisper), "task": "transcription", "data": {"train": str(spoken / "train.jsonl")}}
    )
    objective = run_objective(cfg)
    examples = read_audio_examples(str(spoken / "train.jsonl"), cfg.data, "text")[:2]
    batch = objective.collate(objective.encode(examples))
    prompt = [IDS["<|startoftranscript|>"], IDS["<|notimestamps|>"]]  # an English-only model's prompt
    assert objective.prompt == prompt
    tokenizer = objective.text.tokenizer
    for row, example in enumerate(examples):
        trained = batch["labels"][row][batch["labels"][row] != IGNORE].tolist()
        assert trained == [*tokenizer(" " + example.text, add_special_tokens=False).input_ids, IDS["<|endoftext|>"]]
        assert batch["decoder_input_ids"][row][: len(prompt)].tolist() == prompt
        assert (batch["labels"][row][: len(prompt) - 1] == IGNORE).all()  # the prompt is given, not learned
    assert batch["input_features"].shape[-1] == 2 * 20  # the longest clip, 0.4 s: 20 positions, not 1 s


def test_a_full_run_learns_to_transcribe_and_reloads(tiny_whisper: Path, spoken: Path, tmp_path: Path) -> None:
    result = transcription_run(tiny_whisper, spoken, tmp_path, "full")
    before, after = result.metrics["baseline"]["validation"], result.metrics["validation"]
    assert before["wer"] == 1.0 and after["wer"] == 0.0 and after["cer"] == 0.0
    clips = sorted((spoken / "clips").glob("*.wav"))
    heard = tunesmith.transcribe(result.run_dir, audio=clips)
    assert [h["text"] for h in heard] == [WORDS[c.name.split("-")[0]] for c in clips]
    again = tunesmith.evaluate(result.run_dir, spoken / "validation.jsonl")
    assert again["wer"] == 0.0 and again["loss"] == pytest.approx(after["loss"], rel=1e-4)
    (summary,) = tunesmith.api.run_summaries(tmp_path)
    assert summary.headline == {"wer": 0.0, "cer": 0.0}


def test_a_lora_run_adapts_encoder_and_decoder_and_reloads(tiny_whisper: Path, spoken: Path, tmp_path: Path) -> None:
    # The tiny model's random output layer is frozen under LoRA, so it cannot learn these words as the
    # full run does; what is checked is that the adapter trains on both stacks and reloads exactly.
    lora = {"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj", "fc1"]}
    result = transcription_run(tiny_whisper, spoken, tmp_path, lora, epochs=20, log_every=5)
    saved = load_file(str(result.run_dir / "final" / "trainable.safetensors"))
    assert any(".encoder." in k for k in saved) and any(".encoder_attn." in k for k in saved)
    assert all("lora_" in k for k in saved)
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses == sorted(losses, reverse=True) and len(losses) == 4  # it trains
    again = tunesmith.evaluate(result.run_dir, spoken / "validation.jsonl")
    assert again["loss"] == pytest.approx(result.metrics["validation"]["loss"], rel=1e-5)
    assert again["wer"] == result.metrics["validation"]["wer"]


def test_the_cli_transcribes_a_file_and_a_data_file(
    tiny_whisper: Path,
    spoken: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = transcription_run(tiny_whisper, spoken, tmp_path, "full")
    one = run_cli(monkeypatch, capsys, "transcribe", result.run_dir, spoken / "clips" / "low-0.wav")
    assert one.code == 0 and one.out.strip() == "hello"
    rows = run_cli(monkeypatch, capsys, "transcribe", result.run_dir, "--data", spoken / "validation.jsonl")
    assert [json.loads(line)["text"] for line in rows.out.splitlines()] == ["hello", "the", "hello", "the"]
    refused = run_cli(monkeypatch, capsys, "predict", result.run_dir, str(spoken / "clips" / "low-0.wav"))
    assert refused.code == 2 and "use tunesmith transcribe" in refused.text


@pytest.mark.parametrize(
    ("method", "why"), [("feature-extraction", "trains only a new head"), ("prompt-tuning", "virtual tokens")]
)
def test_methods_that_do_not_fit_are_refused(
    tiny_whisper: Path, spoken: Path, tmp_path: Path, method: str, why: str
) -> None:
    with pytest.raises(ConfigError, match=why):
        transcription_run(tiny_whisper, spoken, tmp_path, method)


def test_error_rates_ignore_case_and_punctuation() -> None:
    assert error_rates(["set a timer", "hello"], ["Set a timer.", "Hello!"]) == {"wer": 0.0, "cer": 0.0}
    rates = error_rates(["set a timer for five minutes"], ["set a timer for 5 minutes"])
    assert rates["wer"] == pytest.approx(1 / 6)  # digits are not normalised to words


def test_the_gate_counts_empty_and_long_transcripts(tiny_whisper: Path, spoken: Path) -> None:
    rows = [json.loads(line) for line in (spoken / "train.jsonl").read_text().splitlines()]
    rows[0]["text"] = "  "
    rows[1]["text"] = "hello " * 40
    (spoken / "dirty.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "model": str(tiny_whisper),
        "task": "transcription",
        "data": {"train": str(spoken / "dirty.jsonl"), "max_length": 20},
    }
    report = tunesmith.check_data(spoken / "dirty.jsonl", config=cfg)  # type: ignore[arg-type]
    assert report.finding("empty").count == 1 and report.finding("overlong_transcript").count == 1
    assert report.finding("unreadable").count == 0 and report.rows == len(rows)
