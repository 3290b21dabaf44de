"""The packaged Whisper tiny.en (CTranslate2) converts once to transformers and transcribes a shipped
clip: "the quick brown fox jumps over the lazy dog", spoken by espeak-ng (`-v en-us -s 125 -g 6`,
resampled to 16 kHz with soxr, OGG/Vorbis). Faster or gapless espeak speech of the same sentence is
misheard by tiny.en ("roundfark stump"), by CTranslate2's own runtime alike."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch

from tunesmith.models.speech import shorten_encoder
from tunesmith.models.whisper_ct2 import convert_ct2_whisper
from tunesmith.zoo import PACKAGED_MODELS, carrier_path

pytestmark = pytest.mark.slow

CLIP = Path(__file__).parents[1] / "data" / "speech" / "quick_brown_fox.ogg"
SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_ct2_whisper(carrier_path(PACKAGED_MODELS["whisper-tiny-en"]), root=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def clip() -> tuple[torch.Tensor, float]:
    """The clip's log-mel features padded to 30 s, (1, 80, 3000), and its length in seconds."""
    import soundfile
    from transformers import WhisperFeatureExtractor

    audio, rate = soundfile.read(CLIP, dtype="float32")  # (samples,) mono, 16 kHz
    assert rate == 16000 and audio.ndim == 1
    features = WhisperFeatureExtractor()(audio, sampling_rate=rate, return_tensors="pt").input_features
    return features, len(audio) / rate


def _transcribe(model: torch.nn.Module, features: torch.Tensor, out: Path) -> str:
    from transformers import WhisperTokenizer

    with torch.no_grad():
        ids = model.generate(features, do_sample=False, num_beams=1)  # (1, T) greedy
    text = WhisperTokenizer.from_pretrained(out).decode(ids[0], skip_special_tokens=True)
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def test_packaged_whisper_converts_to_a_plain_model(converted: Path) -> None:
    from transformers import WhisperForConditionalGeneration

    config = json.loads((converted / "config.json").read_text())
    sizes = {k: config[k] for k in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads")}
    assert sizes == {"d_model": 384, "encoder_layers": 4, "decoder_layers": 4, "encoder_attention_heads": 6}
    assert (config["vocab_size"], config["num_mel_bins"], config["max_source_positions"]) == (51864, 80, 1500)
    generation = json.loads((converted / "generation_config.json").read_text())
    ids = {k: generation[k] for k in ("eos_token_id", "decoder_start_token_id", "no_timestamps_token_id")}
    assert ids == {"eos_token_id": 50256, "decoder_start_token_id": 50257, "no_timestamps_token_id": 50362}
    assert generation["is_multilingual"] is False

    model = WhisperForConditionalGeneration.from_pretrained(converted)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(37.8e6, rel=0.01)
    assert sum(p.numel() for p in model.model.encoder.parameters()) == pytest.approx(8.2e6, rel=0.01)


def test_packaged_whisper_transcribes_the_clip(converted: Path, clip: tuple[torch.Tensor, float]) -> None:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    assert _transcribe(model, clip[0], converted) == SENTENCE


def test_a_shortened_encoder_still_transcribes_the_clip(converted: Path, clip: tuple[torch.Tensor, float]) -> None:
    from transformers import WhisperForConditionalGeneration

    features, seconds = clip
    model = WhisperForConditionalGeneration.from_pretrained(converted).eval()
    frames = shorten_encoder(model, seconds)  # 5.2 s: 261 positions, 522 frames instead of 3000
    assert frames == 2 * model.config.max_source_positions and frames < features.shape[-1] // 5
    assert _transcribe(model, features[..., :frames], converted) == SENTENCE
