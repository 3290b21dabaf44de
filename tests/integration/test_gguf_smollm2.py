"""The packaged SmolLM2-135M-Instruct GGUF, converted once to a plain fp32 directory and reused."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from tunesmith.models.gguf import COMPLETE_MARKER, convert_gguf
from tunesmith.zoo import PACKAGED_MODELS, carrier_path

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    return carrier_path(PACKAGED_MODELS["smollm2-135m"])


@pytest.fixture(scope="module")
def converted(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    root = tmp_path_factory.mktemp("cache")
    start = time.perf_counter()
    out = convert_gguf(smollm2_gguf, root=root)
    return root, out, time.perf_counter() - start


def test_converted_smollm2_matches_the_gguf_model(smollm2_gguf: Path, converted: tuple[Path, Path, float]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, out, _ = converted
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32" and config["tie_word_embeddings"]
    assert (out / COMPLETE_MARKER).is_file() and (out / "generation_config.json").is_file()

    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert getattr(plain, "hf_quantizer", None) is None
    assert plain.lm_head.weight is plain.model.embed_tokens.weight
    assert {p.dtype for p in plain.parameters()} == {torch.float32}

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False)
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # (1, T)

    quantized = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        expected = quantized(ids).logits  # (1, T, 49152)
        got = plain(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_second_call_reuses_the_conversion_quickly(
    smollm2_gguf: Path, converted: tuple[Path, Path, float], capsys: pytest.CaptureFixture[str]
) -> None:
    root, out, first_seconds = converted
    capsys.readouterr()
    start = time.perf_counter()
    assert convert_gguf(smollm2_gguf, root=root) == out
    seconds = time.perf_counter() - start
    assert seconds < 2.0, f"cached lookup took {seconds:.2f}s (conversion took {first_seconds:.1f}s)"
    assert "converting" not in capsys.readouterr().err
