"""GGUF export of tiny Llama runs: the file holds what llama.cpp's llama expects (metadata keys, tensor
names, q/k rows in llama.cpp's rotary layout, tied or untied output, the tokenizer and chat template),
reads back with transformers' GGUF reader in a fresh process that never imports tunesmith and computes
what the trained model computed; the Modelfile's template renders as the chat template does; runs
llama.cpp cannot hold are refused in one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

import tunesmith
from conftest import CHATML, run_cli, write_jsonl
from tunesmith.errors import ConfigError
from tunesmith.exports.gguf import FILE, TOLERANCE
from tunesmith.exports.ollama import modelfile
from tunesmith.exports.parity import ParityError

WORDS = ["red", "blue", "green", "gold"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def qa_rows(n: int) -> list[dict]:
    return [{"prompt": f"colour of {WORDS[i % 4]} {i}?", "completion": WORDS[i % 4]} for i in range(n)]


def make_bpe_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE with merges learned from the QA rows (llama.cpp needs merges) and ChatML specials:
    ids 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>` (EOS and pad, as in SmolLM2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([f"{r['prompt']} {r['completion']}" for r in qa_rows(64)], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def make_bpe_llama(path: Path, tied: bool, padding: int = 0) -> Path:
    """A 2-layer Llama (4 query heads, 2 key/value heads) with the BPE tokenizer above; `padding` unused
    embedding rows past the vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_bpe_tokenizer()
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer) + padding,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def sft_run(model: Path, tmp_path: Path, method: object, **train: object) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    result = tunesmith.train(
        model=str(model),
        task="sft",
        method=method,
        data={"train": str(write_jsonl(tmp_path / "qa.jsonl", qa_rows(32))), "validation": 0.25, "max_length": 48},
        train={"epochs": 2, "batch_size": 8, "lr": 1e-2, "precision": "fp32", **train},
        eval={"samples": 0},
        output={"dir": str(tmp_path / "runs")},
    )
    return result.run_dir


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf-lora")
    # No dropout: the trained weights then do not depend on which dropout kernel this machine measured
    # faster, and the greedy generations compared below are those of one model on every machine.
    return sft_run(make_bpe_llama(root / "tied", tied=True), root, {"name": "lora", "dropout": 0.0})


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gguf-full")
    return sft_run(make_bpe_llama(root / "untied", tied=False, padding=3), root, "full")


@pytest.fixture(scope="module")
def lora_f16(lora_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gguf-export") / "f16"
    tunesmith.export(lora_run, "gguf", out, rows=4)
    return out


def read_gguf(path: Path) -> tuple[dict, dict]:
    """(metadata key -> value, tensor name -> (type name, shape as numpy sees it)) of a GGUF file."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: (t.tensor_type.name, tuple(int(n) for n in reversed(t.shape))) for t in reader.tensors}
    return fields, tensors


def gguf_matrix(path: Path, name: str) -> np.ndarray:
    from gguf import GGUFReader, dequantize

    (tensor,) = [t for t in GGUFReader(path).tensors if t.name == name]
    return dequantize(tensor.data, tensor.tensor_type)  # type: ignore[no-any-return]


def llama_names(layers: int, tied: bool) -> set[str]:
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = {"token_embd.weight", "output_norm.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(layers) for n in per_block
    }
    return names if tied else names | {"output.weight"}


# --- parity -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, "q8_0"])
def test_a_lora_run_exports_f16_and_q8_0_with_parity(lora_run: Path, tmp_path: Path, quantize: str | None) -> None:
    done = tunesmith.export(lora_run, "gguf", tmp_path / "out", quantize=quantize, rows=4)
    kind = quantize or "f16"
    scale = max(1.0, float(load_file(tmp_path / "out" / "probe.safetensors")["logits_top_values"].abs().max()))
    # The tolerance scales with the largest |logit| (the file keeps the top ones: at least that large).
    assert done.quantize == kind and done.parity.tolerance >= TOLERANCE[kind] * scale * (1 - 1e-6)
    assert done.parity.ok and done.parity.generations_equal and done.parity.labels_equal == 1.0
    assert 0 < done.parity.max_abs_diff <= done.parity.tolerance  # rounded weights: close, not equal
    assert done.details["same_argmax_all_positions"] == 1.0 and done.details["generation_rule"]
    _, tensors = read_gguf(tmp_path / "out" / FILE)
    assert tensors["blk.0.attn_q.weight"][0] == kind.upper() and tensors["blk.0.attn_norm.weight"][0] == "F32"
    assert "ollama create" in done.load_hint and f"llama-cli -m {FILE}" in done.load_hint
    facts = json.loads((tmp_path / "out" / "export.json").read_text())
    assert facts["export"]["parity"]["greedy_generations_identical"] is True


def test_a_full_run_of_an_untied_model_keeps_its_output_matrix(full_run: Path, tmp_path: Path) -> None:
    done = tunesmith.export(full_run, "gguf", tmp_path / "out", rows=4)
    assert done.parity.ok and done.parity.generations_equal and not done.details["tied_embeddings"]
    fields, tensors = read_gguf(tmp_path / "out" / FILE)
    assert set(tensors) == llama_names(2, tied=False)
    vocab = fields["llama.vocab_size"]
    assert tensors["output.weight"][1] == tensors["token_embd.weight"][1] == (vocab, 32)
    # The 3 embedding rows past the vocabulary are unused padding tokens.
    assert fields["tokenizer.ggml.tokens"][-3:] == [f"[PAD{i}]" for i in range(vocab - 3, vocab)]
    assert fields["tokenizer.ggml.token_type"][-3:] == [5, 5, 5]  # UNUSED


def test_the_file_reads_back_in_a_process_without_tunesmith(lora_f16: Path, lora_run: Path) -> None:
    script = r"""
import json, sys
from pathlib import Path
import torch, transformers
from safetensors.torch import load_file
out = Path(sys.argv[1])
probe = load_file(str(out / "probe.safetensors"))
facts = json.loads((out / "export.json").read_text())
model = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32).eval()
tokenizer = transformers.AutoTokenizer.from_pretrained(out, gguf_file="model.gguf")
with torch.no_grad():
    logits = model(input_ids=probe["input.input_ids"], attention_mask=probe["input.attention_mask"]).logits
    keep = probe["mask"].bool()
    logits = logits.gather(-1, probe["logits_top_indices"])  # at the trained model's top tokens
    generations = []
    for prompt in facts["probe"]["prompts"]:
        ids = torch.tensor([prompt])
        new = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=facts["probe"]["max_new_tokens"])[0, len(prompt):].tolist()
        end = model.generation_config.eos_token_id
        generations.append(new[: new.index(end)] if end in new else new)
texts = ["colour of red 5?", "gold and green 12", "<|im_start|>user\nhi<|im_end|>\n"]
print(json.dumps({
    "max_diff": float((logits[keep] - probe["logits_top_values"][keep]).abs().max()),
    "generations_equal": generations == facts["probe"]["generations"],
    "ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
    "chat_template": tokenizer.chat_template,
    "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
    "tunesmith_imported": any(name.split(".")[0] == "tunesmith" for name in sys.modules),
}))
"""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(lora_f16)], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert not seen["tunesmith_imported"]
    tolerance = json.loads((lora_f16 / "export.json").read_text())["export"]["parity"]["tolerance"]
    assert seen["max_diff"] <= tolerance and seen["generations_equal"] and seen["tied"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(lora_run / "final" / "tokenizer")
    texts = ["colour of red 5?", "gold and green 12", "<|im_start|>user\nhi<|im_end|>\n"]
    assert seen["ids"] == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert seen["chat_template"] == CHATML


def test_argmax_counts_where_the_trained_model_leads_by_more_than_twice_the_tolerance() -> None:
    import torch

    from tunesmith.exports.parity import Probe, compare

    trained = torch.tensor([[[1.0, 1.0, 0.0], [3.0, 0.0, 0.0]]])  # (1, 2, V): an exact tie, then a clear lead
    probe = Probe("rows", {}, trained, torch.ones(1, 2, dtype=torch.long))
    tie_broken = compare(probe, torch.tensor([[[0.9, 1.0, 0.0], [2.9, 0.0, 0.0]]]), tolerance=0.1)
    assert (tie_broken.labels_equal, tie_broken.decided, tie_broken.same_argmax_all) == (1.0, (1, 2), 0.5)
    lead_lost = compare(probe, torch.tensor([[[1.0, 1.0, 0.0], [0.0, 3.0, 0.0]]]), tolerance=0.1)
    assert (lead_lost.labels_equal, lead_lost.decided) == (0.0, (1, 2)) and not lead_lost.ok


def test_q4_0_is_refused_with_what_it_measured(lora_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"q4_0 does not hold quality: .* changed 2 of 8 greedy answers") as refused:
        tunesmith.export(lora_run, "gguf", tmp_path / "out", quantize="q4_0")
    assert "\n" not in str(refused.value) and not (tmp_path / "out").exists()


# --- what llama.cpp expects --------------------------------------------------------------------------
def test_the_metadata_and_tensor_names_are_llama_cpps(lora_f16: Path, lora_run: Path) -> None:
    from transformers import AutoTokenizer

    fields, tensors = read_gguf(lora_f16 / FILE)
    expected = {
        "general.architecture": "llama",
        "llama.context_length": 256,
        "llama.embedding_length": 32,
        "llama.block_count": 2,
        "llama.feed_forward_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 8,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHATML,
        "general.file_type": 1,  # MOSTLY_F16
    }
    assert {key: fields.get(key) for key in expected} == expected
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    tokenizer = AutoTokenizer.from_pretrained(lora_run / "final" / "tokenizer")
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    assert fields["llama.vocab_size"] == len(vocab) == len(fields["tokenizer.ggml.tokens"])
    assert fields["tokenizer.ggml.tokens"] == [token for token, _ in vocab]
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 1]  # the ChatML specials are CONTROL
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in merges] != []
    # Tied embeddings: no output.weight, as llama.cpp writes them (it projects with token_embd).
    assert set(tensors) == llama_names(2, tied=True)
    assert {t for t, _ in tensors.values()} == {"F16", "F32"}
    assert tensors["blk.0.attn_k.weight"] == ("F16", (16, 32))  # 2 kv heads x 8: (out, in)


def test_q_and_k_rows_are_in_llama_cpps_rotary_layout(lora_f16: Path, lora_run: Path) -> None:
    """llama.cpp's llama rotates adjacent pairs (x[2i], x[2i+1]) by angle p * base^(-2i/d); transformers
    rotates halves (x[i], x[i + d/2]) by the same angles. With the file's q and k rows, attention
    scores under llama.cpp's rotation equal those of the trained weights under transformers'; and
    transformers' GGUF reader turns the file's rows back into the trained ones."""
    import torch
    from transformers import AutoModelForCausalLM

    from tunesmith.inference import load_trained
    from tunesmith.models.causal_lm import base_decoder

    trained = load_trained(lora_run)
    trained.method.merge(trained.model)
    attention = base_decoder(trained.model.backbone).layers[0].self_attn
    want_q = attention.q_proj.weight.detach().numpy()  # (heads * d, hidden), half-split layout
    want_k = attention.k_proj.weight.detach().numpy()
    got_q, got_k = (
        gguf_matrix(lora_f16 / FILE, "blk.0.attn_q.weight"),
        gguf_matrix(lora_f16 / FILE, "blk.0.attn_k.weight"),
    )
    assert not np.allclose(got_q, want_q, atol=1e-2)  # the file's rows are reordered
    d, base = 8, 10000.0
    frequencies = base ** (-np.arange(0, d, 2) / d)  # one per rotated pair
    x = np.random.default_rng(0).normal(size=32).astype(np.float32)

    def halves(v: np.ndarray, position: int) -> np.ndarray:  # transformers: rotate_half
        cos, sin = np.cos(position * frequencies), np.sin(position * frequencies)
        a, b = v[: d // 2], v[d // 2 :]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos])

    def pairs(v: np.ndarray, position: int) -> np.ndarray:  # llama.cpp (GGML_ROPE_TYPE_NORM)
        cos, sin = np.cos(position * frequencies), np.sin(position * frequencies)
        a, b = v[0::2], v[1::2]
        out = np.empty_like(v)
        out[0::2], out[1::2] = a * cos - b * sin, a * sin + b * cos
        return out

    for head in range(4):  # query head h reads key/value head h // 2; the query at position 7, the key at 2
        q, k = slice(head * d, (head + 1) * d), slice(head // 2 * d, (head // 2 + 1) * d)
        want = halves(want_q[q] @ x, 7) @ halves(want_k[k] @ x, 2)
        got = pairs(got_q[q] @ x, 7) @ pairs(got_k[k] @ x, 2)
        assert abs(got - want) <= 2e-3 * (abs(want) + 1e-3)
        unpermuted = pairs(want_q[q] @ x, 7) @ pairs(want_k[k] @ x, 2)  # the trained rows written as they are
        assert abs(unpermuted - want) > 10 * abs(got - want)
    reread = AutoModelForCausalLM.from_pretrained(lora_f16, gguf_file=FILE, dtype=torch.float32)
    np.testing.assert_allclose(reread.model.layers[0].self_attn.q_proj.weight.detach().numpy(), want_q, atol=1e-3)
    np.testing.assert_allclose(reread.model.layers[0].self_attn.k_proj.weight.detach().numpy(), want_k, atol=1e-3)


def test_without_the_permutation_the_parity_check_fails(lora_run: Path, tmp_path: Path, monkeypatch) -> None:
    import tunesmith.exports.gguf as gguf_export

    monkeypatch.setattr(gguf_export, "permute_qk", lambda weight, heads: weight)
    with pytest.raises(ParityError, match="greedy generations DIFFERENT"):
        tunesmith.export(lora_run, "gguf", tmp_path / "out", rows=4)
    assert not (tmp_path / "out").exists()


# --- Modelfile ---------------------------------------------------------------------------------------
def render_ollama(template: str, messages: list[tuple[str, str]]) -> str:
    """What Ollama renders from a `{{- range .Messages }}...{{ end }}...` template (Role and Content)."""
    match = re.fullmatch(r"(.*)\{\{- range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, re.S)
    assert match, template
    lead, turn, tail = match.groups()
    body = "".join(turn.replace("{{ .Role }}", role).replace("{{ .Content }}", text) for role, text in messages)
    return lead + body + tail


def template_of(text: str) -> str:
    match = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert match, text
    return match.group(1)


def test_the_modelfile_runs_the_export_as_the_run_prompts(lora_f16: Path) -> None:
    text = (lora_f16 / "Modelfile").read_text()
    assert f"FROM ./{FILE}" in text and 'PARAMETER stop "<|im_end|>"' in text and "SYSTEM" not in text
    conversation = [("system", "Be short."), ("user", "colour of red 5?"), ("assistant", "red"), ("user", "and 6?")]
    tokenizer = make_bpe_tokenizer()
    messages = [{"role": role, "content": content} for role, content in conversation]
    want = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert render_ollama(template_of(text), conversation) == want


def test_a_default_system_prompt_becomes_the_modelfiles_system() -> None:
    smollm2 = (  # SmolLM2-Instruct's chat template
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
        "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    made = modelfile(make_bpe_tokenizer(smollm2), smollm2, ["<|im_end|>"])
    assert made.format == "chatml"
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in made.text
    assert made.text.count("PARAMETER stop") == 1
    # Ollama puts SYSTEM in front of a conversation that has no system message.
    conversation = [("system", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"), ("user", "hi")]
    want = make_bpe_tokenizer(smollm2).apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert render_ollama(template_of(made.text), conversation) == want


def test_an_unknown_chat_format_or_plain_prompts_get_no_chat_template() -> None:
    zephyr = "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}<|assistant|>\n"
    made = modelfile(make_bpe_tokenizer(zephyr), zephyr, ["</s>"])
    assert made.format == "none" and "TEMPLATE" not in made.text.replace("# no TEMPLATE", "")
    plain = modelfile(make_bpe_tokenizer(None), None, ["<|im_end|>"])
    assert plain.format == "plain" and 'TEMPLATE """{{ .Prompt }}"""' in plain.text


# --- refusals ------------------------------------------------------------------------------------------
def test_runs_llama_cpp_cannot_hold_are_refused_in_one_line(
    base_config: dict, tiny_llama: Path, tiny_gpt2: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    quick = {"max_steps": 1, "epochs": 1}
    bpe = make_bpe_llama(tmp_path / "bpe", tied=True)
    classifier = tunesmith.train({**base_config, "train": {**base_config["train"], **quick}}).run_dir
    cases = {
        classifier: "a classification run gives a label, and GGUF holds causal language models",
        sft_run(bpe, tmp_path / "prompt", "prompt-tuning", **quick): "prompt-tuning learns virtual tokens",
        sft_run(bpe, tmp_path / "adapter", "adapter", **quick): "adapter adds layers that llama.cpp's llama lacks",
        sft_run(tiny_gpt2, tmp_path / "gpt2", "lora", **quick): "this is a gpt2 model",
        sft_run(tiny_llama, tmp_path / "merges", "lora", **quick): "the tokenizer has no BPE merges",
    }
    for run, reason in cases.items():
        with pytest.raises(ConfigError) as refused:
            tunesmith.export(run, "gguf", tmp_path / "x")
        assert reason in str(refused.value) and "\n" not in str(refused.value)
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.partial-*"))
    result = run_cli(monkeypatch, capsys, "export", classifier, "--format", "gguf", "-o", tmp_path / "x")
    assert result.code == 2 and cases[classifier] in result.text
