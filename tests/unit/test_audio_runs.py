"""Audio classification runs end to end on a tiny Whisper built in-process, on tones written as
audio files: every fitting method trains and reloads to the same predictions, the encoder is cut to
the clips' length, frozen work is cached, prompt tuning is refused, and the audio gate counts
exactly what was put into a dirtied copy of the data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from safetensors.torch import load_file

import tunesmith
from tunesmith.data.audio import Clip, decode_audio
from tunesmith.data.load import read_audio_examples
from tunesmith.data.split import split_by_hash
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval.evaluate import evaluate_items
from tunesmith.inference import load_trained, runtime_for

RATE = 16000


def make_tiny_whisper(path: Path) -> Path:
    """A 2-layer Whisper (d_model 16, 80 mel bins) and its feature extractor, saved to `path`."""
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=64,
        num_mel_bins=80,
        d_model=16,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperForConditionalGeneration(config).save_pretrained(path)
    WhisperFeatureExtractor().save_pretrained(path)
    return path


def tone(freq: float, seconds: float, seed: int, rate: int = RATE) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28)) + 0.01 * rng.standard_normal(len(t))
    return wave.astype(np.float32)


def write_tones(root: Path, n: int = 12, seconds: float = 0.5) -> Path:
    """`root/low|high/<i>.wav`: low (200-300 Hz) and high (2-3 kHz) tones, some at 8 kHz or in stereo."""
    for label, base in (("low", 200.0), ("high", 2000.0)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rate = 8000 if i % 4 == 3 else RATE
            wave = tone(base * (1 + i / n / 2), seconds * (0.8 + 0.4 * (i % 3) / 2), seed=i + int(base), rate=rate)
            if i % 5 == 4:
                wave = np.stack([wave, wave * 0.5], axis=1)  # stereo: mixed down to mono
            soundfile.write(root / label / f"{i}.wav", wave, rate)
    return root


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_whisper(tmp_path_factory.mktemp("whisper") / "model")


@pytest.fixture()
def tones(tmp_path: Path) -> Path:
    return write_tones(tmp_path / "tones")


def audio_run(model: Path, data: Path, out: Path, method: object, **train: object) -> tunesmith.api.RunResult:
    return tunesmith.train(
        model=str(model),
        task="audio-classification",
        method=method,
        data={"train": str(data), "validation": 0.25},
        train={"epochs": 3, "batch_size": 6, "lr": 1e-2, "log_every": 1, **train},
        output={"dir": str(out)},
    )


@pytest.mark.parametrize("method", ["full", "feature-extraction", "partial", "lora", "adapter", "ia3"])
def test_every_fitting_method_trains_and_reloads(tiny_whisper: Path, tones: Path, tmp_path: Path, method: str) -> None:
    result = audio_run(tiny_whisper, tones, tmp_path, method)
    trained = load_trained(result.run_dir)
    _, validation = split_by_hash(read_audio_examples(str(tones), trained.config.data, "label"), 0.25)
    again = evaluate_items(trained.model, trained.objective, trained.objective.encode(validation), runtime_for(trained))
    expected = result.metrics["validation"]
    assert again["confusion"] == expected["confusion"] and expected["count"] == len(validation) > 0
    assert again["loss"] == pytest.approx(expected["loss"], rel=1e-5, abs=1e-6)
    rows = tunesmith.predict(result.run_dir, data=tones)
    assert len(rows) == 24 and set(rows[0]["scores"]) == {"high", "low"}
    one = tunesmith.predict(result.run_dir, texts=[str(tones / "low" / "0.wav")])[0]
    assert one["label"] == rows[12]["label"] and one["scores"] == pytest.approx(rows[12]["scores"], abs=1e-5)


def test_tones_are_learned_and_the_encoder_is_cut_to_the_longest_clip(
    tiny_whisper: Path, tones: Path, tmp_path: Path
) -> None:
    result = audio_run(tiny_whisper, tones, tmp_path, "full", epochs=15, lr=1e-2)
    assert result.metrics["validation"]["accuracy"] == 1.0  # low against high tones: an easy task
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["audio"]["max_seconds"] == 0.6  # the longest clip, 0.6 s, as it was written
    trained = load_trained(result.run_dir)
    encoder = trained.model.backbone
    assert encoder.embed_positions.num_embeddings == 30 and encoder.config.max_source_positions == 30
    examples = read_audio_examples(str(tones), trained.config.data, "label")[:2]
    batch = trained.objective.collate(trained.objective.encode(examples))
    assert batch["input_features"].shape == (2, 80, 60)  # 0.6 s: 60 mel frames, not 3,000


def test_max_seconds_cuts_longer_clips_and_the_gate_says_so(tiny_whisper: Path, tones: Path, tmp_path: Path) -> None:
    cfg = {
        "model": str(tiny_whisper),
        "task": "audio-classification",
        "data": {"train": str(tones), "max_seconds": 0.5},
    }
    report = tunesmith.check_data(tones, config=cfg)  # type: ignore[arg-type]
    overlong = report.finding("overlong")
    long_clips = sum(1 for p in tones.rglob("*.wav") if soundfile.info(p).duration > 0.5 + 1e-6)
    assert overlong.count == long_clips > 0


def test_partial_caches_the_frozen_blocks_and_matches_an_uncached_run(
    tiny_whisper: Path, tones: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunesmith.tasks import audio_classification as task_module
    from tunesmith.training.input_cache import cache_input_states

    calls: list[bool] = []

    def spy(*args: object, **kwargs: object) -> list | None:
        cached = cache_input_states(*args, **kwargs)  # type: ignore[arg-type]
        calls.append(cached is not None)
        return cached

    method = {"name": "partial", "freeze_layers": 1}
    monkeypatch.setattr(task_module, "cache_input_states", spy)
    cached = audio_run(tiny_whisper, tones, tmp_path / "cached", method)
    assert calls == [True, True]  # train and validation clips ran the frozen block once
    monkeypatch.setattr(task_module, "cache_input_states", lambda *args, **kwargs: None)  # as if it could not split
    plain = audio_run(tiny_whisper, tones, tmp_path / "plain", method)
    want = load_file(str(plain.run_dir / "final" / "trainable.safetensors"))
    got = load_file(str(cached.run_dir / "final" / "trainable.safetensors"))
    assert want.keys() == got.keys() and any("layers.1." in name for name in got)
    assert not any("layers.0." in name or "conv" in name for name in got)  # the stem and block 0 froze
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-5, msg=name)


def test_prompt_tuning_is_refused_with_the_reason(tiny_whisper: Path, tones: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="speech encoder takes sound, not tokens"):
        audio_run(tiny_whisper, tones, tmp_path, "prompt-tuning")


def test_audio_sources_decode_to_mono_at_the_model_rate(tmp_path: Path) -> None:
    wave = tone(440, 0.25, seed=1, rate=8000)
    soundfile.write(tmp_path / "a.flac", np.stack([wave, wave], axis=1), 8000)
    rows = [{"audio": "a.flac", "label": "x"}, {"audio": {"array": wave.tolist(), "sampling_rate": 8000}, "label": "y"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import pyarrow as pa
    import pyarrow.parquet as pq

    stored = {"bytes": (tmp_path / "a.flac").read_bytes(), "path": "a.flac"}  # as datasets stores audio
    pq.write_table(pa.table({"audio": [stored], "label": ["x"]}), tmp_path / "rows.parquet")
    from tunesmith.config import DataConfig

    data = DataConfig(train="x")
    examples = read_audio_examples(str(tmp_path / "rows.jsonl"), data, "label")
    examples.insert(1, read_audio_examples(str(tmp_path / "rows.parquet"), data, "label")[0])
    decoded = [decode_audio(e.audio, RATE, e.where) for e in examples]
    assert [len(d) for d in decoded] == [4000, 4000, 4000]
    assert np.allclose(decoded[0], decoded[2], atol=2e-3) and np.array_equal(decoded[0], decoded[1])
    assert isinstance(examples[2].audio, Clip) and examples[0].key() == examples[1].key()


def test_bad_audio_is_named(tmp_path: Path) -> None:
    (tmp_path / "broken.wav").write_bytes(b"RIFF....not audio")
    with pytest.raises(DataError, match=r"broken\.wav: cannot read the audio"):
        decode_audio(str(tmp_path / "broken.wav"), RATE, str(tmp_path / "broken.wav"))
    soundfile.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), RATE)
    with pytest.raises(DataError, match="empty"):
        decode_audio(str(tmp_path / "empty.wav"), RATE, "empty.wav")


def test_the_gate_counts_what_was_put_into_a_dirtied_copy(tiny_whisper: Path, tones: Path, tmp_path: Path) -> None:
    dirty = tmp_path / "dirty"
    shutil.copytree(tones, dirty)
    (dirty / "low" / "broken.wav").write_bytes(b"RIFF garbage")  # 1 unreadable
    soundfile.write(dirty / "high" / "quiet.wav", np.zeros(8000, dtype=np.float32), RATE)  # 1 silent
    shutil.copy(dirty / "low" / "1.wav", dirty / "low" / "copy-of-1.wav")  # 1 duplicate
    shutil.copy(dirty / "low" / "2.wav", dirty / "high" / "2-as-high.wav")  # 1 duplicate, 1 conflicting
    held = tmp_path / "held"
    (held / "low").mkdir(parents=True)
    shutil.copy(dirty / "low" / "5.wav", held / "low" / "5.wav")  # 1 leaked
    soundfile.write(held / "low" / "new.wav", tone(250, 0.5, seed=99), RATE)
    report = tunesmith.check_data(dirty, task="audio-classification", validation=held)
    counts = {f.name: f.count for f in report.findings}
    assert counts["unreadable"] == 1 and report.unreadable == (str(dirty / "low" / "broken.wav"),)
    assert counts["silent"] == 1 and counts["duplicates"] == 2 and counts["conflicting"] == 1
    assert counts["leakage"] == 1
    assert counts["sample_rates"] == 6  # clips 3, 7 and 11 of each label were written at 8 kHz
    assert report.finding("sample_rates").stats["rates"] == {"8000": 6, "16000": 23}
    assert report.finding("label_balance").stats["labels"] == {"high": 14, "low": 14}


def make_tiny_wav2vec2(path: Path) -> Path:
    """A 2-layer wav2vec2 (hidden 16, a 2-layer conv front end) and its feature extractor, saved to `path`."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8, 8),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        mask_time_prob=0.0,
    )
    Wav2Vec2Model(config).save_pretrained(path)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_waveform_encoder_trains_and_reloads(tones: Path, tmp_path: Path, method: str) -> None:
    model = make_tiny_wav2vec2(tmp_path / "wav2vec2")
    result = audio_run(model, tones, tmp_path / "runs", method)
    trained = load_trained(result.run_dir)
    assert trained.objective.inputs.kind == "waveform" and trained.objective.inputs.max_samples == 9600
    _, validation = split_by_hash(read_audio_examples(str(tones), trained.config.data, "label"), 0.25)
    again = evaluate_items(trained.model, trained.objective, trained.objective.encode(validation), runtime_for(trained))
    assert again["confusion"] == result.metrics["validation"]["confusion"]
    assert again["loss"] == pytest.approx(result.metrics["validation"]["loss"], rel=1e-5, abs=1e-6)


def test_a_saved_datasets_directory_is_read(tmp_path: Path) -> None:
    import pyarrow as pa

    from tunesmith.config import DataConfig

    wave = tone(300, 0.2, seed=3)
    soundfile.write(tmp_path / "a.wav", wave, RATE)
    stored = {"bytes": (tmp_path / "a.wav").read_bytes(), "path": "a.wav"}
    table = pa.table({"audio": [stored, stored], "label": ["x", "y"]})
    saved = tmp_path / "saved"
    saved.mkdir()
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (saved / "dataset_info.json").write_text("{}")
    examples = read_audio_examples(str(saved), DataConfig(train="x"), "label")
    assert [e.label for e in examples] == ["x", "y"] and examples[0].where == "data-00000-of-00001.arrow row 0"
    assert np.allclose(decode_audio(examples[0].audio, RATE), wave, atol=1e-4)
