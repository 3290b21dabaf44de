"""GGUF base models: the cache location, error messages, and a real conversion of a tiny GGUF Llama."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tunesmith.errors import ConfigError
from tunesmith.models import gguf as gguf_module
from tunesmith.models.gguf import COMPLETE_MARKER, cache_root, convert_gguf
from tunesmith.models.load import resolve_model_path
from tunesmith.zoo import PACKAGED_MODELS, carrier_path, model_source_path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["h e", "l l", "Ġ t"]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
# llama.cpp's name for each per-block HF weight
BLOCK_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
HEADS, KV_HEADS, LAYERS, HIDDEN = 4, 2, 2, 32


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (transformers reverses it when it loads a llama GGUF)."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def make_tiny_gguf(path: Path, seed: int = 0) -> torch.nn.Module:
    """Write a 2-layer Llama with a byte-level BPE tokenizer as an F32 GGUF; return the HF model."""
    from gguf import GGUFWriter
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = SPECIALS + _byte_chars() + [merge.replace(" ", "") for merge in MERGES]
    config = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    weights = {name: tensor.numpy() for name, tensor in model.state_dict().items()}

    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(2 * HIDDEN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_file_type(0)  # all F32
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3 = control
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])  # no output.weight: tied
    for layer in range(LAYERS):
        for hf_name, gguf_name in BLOCK_NAMES.items():
            weight = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                weight = _permute(weight, HEADS if gguf_name == "attn_q" else KV_HEADS)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return path, make_tiny_gguf(path)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits  # (1, T, vocab)


# --- cache location ---------------------------------------------------------------------------


def test_cache_root_prefers_tunesmith_cache_then_xdg_then_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("TUNESMITH_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == tmp_path / "home" / ".cache" / "tunesmith"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "tunesmith"
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    monkeypatch.setenv("TUNESMITH_CACHE", "")  # empty counts as unset
    assert cache_root() == tmp_path / "xdg" / "tunesmith"


# --- resolving names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M", "/some/model/dir", "./local"])
def test_resolve_model_path_passes_non_gguf_names_through(name: str) -> None:
    assert resolve_model_path(name) == name
    assert model_source_path(name) == name


def test_packaged_directory_model_is_unchanged() -> None:
    expected = str(carrier_path(PACKAGED_MODELS["minilm-l6"]))
    assert resolve_model_path("minilm-l6") == expected == model_source_path("minilm-l6")


def test_packaged_smollm2_is_registered_as_its_gguf_file() -> None:
    assert model_source_path("smollm2-135m").endswith("SmolLM2-135M-Instruct.Q4_1.gguf")


def test_missing_gguf_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(ConfigError, match="no such GGUF file") as err:
        resolve_model_path(str(missing))
    assert str(missing) in str(err.value)


def test_a_file_that_is_not_gguf_is_refused_before_any_conversion(tmp_path: Path) -> None:
    fake = tmp_path / "weights.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF")
    with pytest.raises(ConfigError, match="not a GGUF file") as err:
        convert_gguf(fake, root=tmp_path / "cache")
    assert str(fake) in str(err.value)
    assert not (tmp_path / "cache" / "models").exists()


def test_an_architecture_transformers_cannot_load_names_the_file_and_reason(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), "notamodel")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="cannot load this GGUF model.*notamodel") as err:
        convert_gguf(path, root=tmp_path / "cache")
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # the partial build is gone


# --- the file hash ----------------------------------------------------------------------------


def test_file_hash_is_remembered_until_the_file_changes(tmp_path: Path) -> None:
    import hashlib

    data = tmp_path / "model.gguf"
    data.write_bytes(b"GGUF one")
    root = tmp_path / "cache"
    assert gguf_module._file_sha256(data, root) == hashlib.sha256(b"GGUF one").hexdigest()

    # The sidecar is trusted while (size, mtime_ns) match: a planted digest comes back unread.
    sidecar = root / "gguf-sha256.json"
    known = json.loads(sidecar.read_text())
    known[str(data)]["sha256"] = "f" * 64
    sidecar.write_text(json.dumps(known))
    assert gguf_module._file_sha256(data, root) == "f" * 64

    data.write_bytes(b"GGUF two, longer")
    assert gguf_module._file_sha256(data, root) == hashlib.sha256(b"GGUF two, longer").hexdigest()


def test_an_unreadable_hash_sidecar_is_rebuilt(tmp_path: Path) -> None:
    import hashlib

    data = tmp_path / "model.gguf"
    data.write_bytes(b"GGUF x")
    root = tmp_path / "cache"
    root.mkdir()
    (root / "gguf-sha256.json").write_text("{not json")
    assert gguf_module._file_sha256(data, root) == hashlib.sha256(b"GGUF x").hexdigest()
    assert str(data) in json.loads((root / "gguf-sha256.json").read_text())


# --- a real conversion of a tiny GGUF ---------------------------------------------------------


def test_conversion_gives_a_plain_fp32_model_with_the_same_logits(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, original = tiny_gguf
    out = convert_gguf(path, root=tmp_path)
    assert out.parent == tmp_path / "models" and out.name.startswith("tiny-llama-") and len(out.name) == 27
    assert f"converting {path.name} to fp32 once; cached in {out}" in capsys.readouterr().err
    assert (out / COMPLETE_MARKER).is_file() and (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"

    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(converted, "hf_quantizer", None) is None
    assert converted.lm_head.weight is converted.model.embed_tokens.weight  # still tied
    assert {p.dtype for p in converted.parameters()} == {torch.float32}
    gguf_loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("hello the world", return_tensors="pt").input_ids  # (1, T)
    expected = _logits(original, ids)
    torch.testing.assert_close(_logits(converted, ids), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(gguf_loaded.eval(), ids), expected, atol=1e-6, rtol=0)


def test_a_converted_file_is_reused_and_a_changed_file_converted_again(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = tiny_gguf
    first = convert_gguf(path, root=tmp_path)
    capsys.readouterr()
    assert convert_gguf(path, root=tmp_path) == first
    assert "converting" not in capsys.readouterr().err

    changed = tmp_path / "copy" / path.name
    changed.parent.mkdir()
    make_tiny_gguf(changed, seed=1)
    second = convert_gguf(changed, root=tmp_path)
    assert second != first and second.name.startswith("tiny-llama-")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == sorted([first.name, second.name])


def test_an_interrupted_conversion_leaves_nothing_trusted(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(path: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    path, _ = tiny_gguf
    monkeypatch.setattr(gguf_module, "_write_plain_model", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, root=tmp_path)
    assert list((tmp_path / "models").iterdir()) == []


def test_a_conversion_finished_first_by_another_process_wins(
    tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = tiny_gguf

    def race(source: Path, out: Path) -> None:
        (out / "mine.txt").write_text("mine")
        theirs = out.parent / out.name[1:].rsplit(".", 2)[0]  # out is `.<target>.<random>.partial`
        theirs.mkdir()
        (theirs / "theirs.txt").write_text("theirs")
        (theirs / COMPLETE_MARKER).write_text("{}")

    monkeypatch.setattr(gguf_module, "_write_plain_model", race)
    out = convert_gguf(path, root=tmp_path)
    assert (out / "theirs.txt").is_file() and not (out / "mine.txt").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [out.name]  # ours is discarded


def test_a_truncated_gguf_is_a_config_error(tiny_gguf: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, _ = tiny_gguf
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(ConfigError, match="cut.gguf: transformers cannot load this GGUF model"):
        convert_gguf(truncated, root=tmp_path / "cache")
    assert list((tmp_path / "cache" / "models").iterdir()) == []
