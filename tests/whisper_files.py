"""A tiny Whisper written here, as transformers holds it and as CTranslate2's binary format v6 holds it
(DESIGN §12), with a byte-level BPE tokenizer that has Whisper's special tokens: for the converter's
tests and for speech runs that need a whole Whisper directory (tokenizer and generation config)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

D_MODEL, HEADS, LAYERS, MELS, SOURCE, TARGET = 16, 2, 2, 8, 20, 12
MERGES = ["h e", "l l", "Ġ t"]
# Whisper's special tokens, in OpenAI's order, right after the regular tokens
SPECIALS = [
    "<|endoftext|>",
    "<|startoftranscript|>",
    "<|en|>",
    "<|translate|>",
    "<|transcribe|>",
    "<|startoflm|>",
    "<|startofprev|>",
    "<|nocaptions|>",
    "<|notimestamps|>",
]
# CTranslate2's dtype ids
F32, I8, I16, F16, BF16 = 0, 1, 2, 4, 5


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character for each of the 256 bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


REGULAR = _byte_chars() + [m.replace(" ", "") for m in MERGES]
IDS = {token: len(REGULAR) + i for i, token in enumerate(SPECIALS)}
VOCAB = len(REGULAR) + len(SPECIALS) + 3  # three ids past the tokenizer, as timestamps are in Whisper


def _tokenizer_json() -> dict:
    """A byte-level BPE tokenizer.json with Whisper's special tokens, built locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(REGULAR)}, [tuple(m.split()) for m in MERGES]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    data = json.loads(tok.to_str())
    data["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
        | {"special": True}
        for t, i in IDS.items()
    ]
    return data


def make_tiny_whisper(seed: int = 0, source: int = SOURCE):  # -> WhisperForConditionalGeneration
    """A 2-layer Whisper (d_model 16, 8 mel bins) over `source` encoder positions (50 a second)."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        vocab_size=VOCAB,
        num_mel_bins=MELS,
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=LAYERS,
        encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS,
        encoder_ffn_dim=2 * D_MODEL,
        decoder_ffn_dim=2 * D_MODEL,
        max_source_positions=source,
        max_target_positions=TARGET,
        bos_token_id=IDS["<|endoftext|>"],
        eos_token_id=IDS["<|endoftext|>"],
        pad_token_id=IDS["<|endoftext|>"],
        decoder_start_token_id=IDS["<|startoftranscript|>"],
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # layer norms and biases start at 1 and 0: make them tell apart
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith(".bias") or "embed_positions" in name:
                param.normal_(0, 0.5)
    return model


def _ct2_variables(model, dtype: int) -> dict[str, tuple[np.ndarray, int]]:
    """The CTranslate2 variables of a transformers Whisper, written from DESIGN §12's name list."""
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out: dict[str, tuple[np.ndarray, int]] = {}

    def put(name: str, value: np.ndarray) -> None:
        out[name] = (value, dtype)

    def linear(ct2: str, hf: str) -> None:
        put(f"{ct2}/weight", sd[f"{hf}.weight"])
        put(f"{ct2}/bias", sd[f"{hf}.bias"])

    def norm(ct2: str, hf: str) -> None:
        put(f"{ct2}/gamma", sd[f"{hf}.weight"])
        put(f"{ct2}/beta", sd[f"{hf}.bias"])

    def stacked(ct2: str, hfs: list[str]) -> None:  # k has no bias: CTranslate2 stores zeros for it
        put(f"{ct2}/weight", np.concatenate([sd[f"{h}.weight"] for h in hfs]))
        zeros = np.zeros(D_MODEL, np.float32)
        put(f"{ct2}/bias", np.concatenate([sd.get(f"{h}.bias", zeros) for h in hfs]))

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{side}/num_heads"] = (np.array(HEADS, np.int16), I16)
        put(f"{side}/position_encodings/encodings", sd[f"{hf}.embed_positions.weight"])
        norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        for i in range(LAYERS):
            ct2, layer = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            stacked(f"{ct2}/self_attention/linear_0", [f"{layer}.self_attn.{p}_proj" for p in "qkv"])
            linear(f"{ct2}/self_attention/linear_1", f"{layer}.self_attn.out_proj")
            norm(f"{ct2}/self_attention/layer_norm", f"{layer}.self_attn_layer_norm")
            linear(f"{ct2}/ffn/linear_0", f"{layer}.fc1")
            linear(f"{ct2}/ffn/linear_1", f"{layer}.fc2")
            norm(f"{ct2}/ffn/layer_norm", f"{layer}.final_layer_norm")
            if side == "decoder":
                linear(f"{ct2}/attention/linear_0", f"{layer}.encoder_attn.q_proj")
                stacked(f"{ct2}/attention/linear_1", [f"{layer}.encoder_attn.{p}_proj" for p in "kv"])
                linear(f"{ct2}/attention/linear_2", f"{layer}.encoder_attn.out_proj")
                norm(f"{ct2}/attention/layer_norm", f"{layer}.encoder_attn_layer_norm")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    put("decoder/embeddings/weight", sd["model.decoder.embed_tokens.weight"])
    out["decoder/activation"] = (np.array(3, np.int8), I8)  # a scalar the converter does not need
    return out


def _ct2_string(text: str) -> bytes:
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _ct2_bytes(variables: dict[str, tuple[np.ndarray, int]], spec: str = "WhisperSpec") -> bytes:
    """CTranslate2's binary format v6, little-endian, as DESIGN §12 lays it out."""
    numpy_dtype = {F32: "<f4", I8: "i1", I16: "<i2", F16: "<f2"}
    parts = [struct.pack("<I", 6), _ct2_string(spec), struct.pack("<II", 3, len(variables))]
    for name, (value, dtype) in sorted(variables.items()):
        if dtype == BF16:  # bfloat16's bits, rounded by torch
            data = torch.from_numpy(np.ascontiguousarray(value)).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
        else:
            data = np.ascontiguousarray(value, numpy_dtype[dtype]).tobytes()
        parts += [_ct2_string(name), struct.pack(f"<B{value.ndim}I", value.ndim, *value.shape)]
        parts += [struct.pack("<BI", dtype, len(data)), data]
    parts += [struct.pack("<I", 1), _ct2_string("decoder/projection/weight"), _ct2_string("decoder/embeddings/weight")]
    return b"".join(parts)


def write_ct2_whisper(directory: Path, model, dtype: int = F32) -> Path:
    """A CTranslate2 Whisper directory (model.bin, config.json, tokenizer.json) holding `model`."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.bin").write_bytes(_ct2_bytes(_ct2_variables(model, dtype)))
    config = {"alignment_heads": [[1, 0]], "suppress_ids": [5, 6], "suppress_ids_begin": [IDS["<|endoftext|>"]]}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    return directory
