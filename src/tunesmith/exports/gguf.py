"""`--format gguf`: one `model.gguf` that llama.cpp and Ollama run, with an Ollama `Modelfile` beside it.

For llama-family causal LMs (transformers' `model_type: llama`: SmolLM2, TinyLlama, Llama 2/3 without
rope scaling) with a byte-level BPE tokenizer. LoRA and IA3 are merged in fp32 first; the file is
written with the `gguf` package's GGUFWriter the way llama.cpp's own `convert_hf_to_gguf.py` writes
a llama (https://github.com/ggml-org/llama.cpp/blob/master/convert_hf_to_gguf.py):
- the `llama.*` shape keys, and tensors under llama.cpp's names (gguf's own tensor map);
- q and k rows permuted within each head: transformers rotates the two halves of a head
  (`rotate_half`), llama.cpp's llama rotates adjacent pairs, so row i of the first half becomes row
  2i and row i of the second half row 2i + 1 (transformers' GGUF reader undoes exactly this);
- tied input/output embeddings: no `output.weight` (llama.cpp then projects with `token_embd`);
- the tokenizer as `tokenizer.ggml.*` (model gpt2, tokens, token types, merges, special ids,
  add_bos) and the chat template prompts were rendered with as `tokenizer.chat_template`.

Norms stay f32; matrices are f16, or q8_0 with `gguf.quants` (q4_0 is refused: measured, it changes
the answers of the packaged SmolLM2). The file is read back with transformers' GGUF reader (which
dequantizes to fp32) for parity; llama.cpp itself is not run. Parity: every logit within the
tolerance, identical greedy generations, and the same argmax wherever the trained model's top logit
leads its runner-up by more than twice the tolerance (rounded weights may break a closer tie, as they
did an exact one of SmolLM2's; that share and the share over all positions are both reported).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.templates import FALLBACK_CHAT_TEMPLATE, resolve_template
from tunesmith.errors import ConfigError
from tunesmith.exports import Exported
from tunesmith.exports.ollama import modelfile
from tunesmith.exports.parity import Probe, compare, greedy, median_seconds
from tunesmith.inference import Trained
from tunesmith.models.causal_lm import CausalLM, base_decoder

__all__ = ["FILE", "GENERATION_RULE", "TOLERANCE", "check", "export", "permute_qk"]

FILE = "model.gguf"

# Largest |logit difference| allowed, relative to the probe's largest |logit| (at least 1), as the ONNX
# export states its own. Measured on the packaged SmolLM2-135M-Instruct after a 3-step LoRA run (8
# held-out prompts, 588 positions, logits up to 43.8): rounding the weights to f16 moved logits by at
# most 1.0e-3 of the largest (0.045), q8_0 by 3.0e-2 (1.32); the bounds leave 2.5x and 2x room. Greedy
# generations are required to be identical for both: they were, 8 of 8, for f16 and for q8_0.
TOLERANCE = {"f16": 2.5e-3, "q8_0": 6e-2}
GENERATION_RULE = "greedy generations identical to the trained model's (f16 and q8_0: 8 of 8 on SmolLM2-135M)"
# q4_0 (with the embedding kept in q8_0) on the same run moved logits by up to 24.6 (0.56 of the largest),
# changed the next-token argmax at 42% of positions and 2 of the 8 greedy answers at their first token.
_Q4_0_REFUSAL = (
    "--quantize q4_0 does not hold quality: on the packaged SmolLM2-135M it changed 2 of 8 greedy answers and "
    "42% of next-token predictions (logits moved by up to 24.6); use --quantize q8_0, half the size of f16 "
    "with the answers unchanged"
)

# The GGML type of the matrices, per --quantize.
_TYPES = {"f16": "F16", "q8_0": "Q8_0"}
_FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}

# The pre-tokenizers llama.cpp knows by name (`tokenizer.ggml.pre`), as tokenizers' JSON spells them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def check(trained: Trained, quantize: str | None) -> None:
    """Refuse, in one line and before any work, what llama.cpp's llama cannot hold.

    Raises:
        ConfigError: not a causal LM; virtual tokens (prompt/prefix tuning) or bottleneck adapters; an
            architecture other than llama, or a llama with rope scaling, biases or another activation; a
            tokenizer that is not byte-level BPE with merges and a known pre-tokenizer; --quantize q4_0.
    """
    method, model, where = trained.method, trained.model, trained.where
    if not isinstance(model, CausalLM):
        raise ConfigError(
            f"{where}: a {trained.config.task} run gives a {trained.task.output}, and GGUF holds causal language "
            "models (sft, dpo, rl runs); export it with --format hf or --format onnx"
        )
    if method.virtual_tokens:
        raise ConfigError(
            f"{where}: {method.name} learns virtual tokens that llama.cpp cannot hold; export it with --format peft"
        )
    if not method.standard_layers:
        raise ConfigError(
            f"{where}: {method.name} adds layers that llama.cpp's llama lacks; export it with --format onnx"
        )
    config: Any = base_decoder(model.backbone).config
    reason = _llama_refusal(config) or _tokenizer_refusal(trained.objective.tokenizer, config.vocab_size)
    if reason:
        raise ConfigError(f"{where}: {reason}; export it with --format hf")
    if quantize == "q4_0":
        raise ConfigError(f"{where}: {_Q4_0_REFUSAL}")


def export(trained: Trained, probe: Probe, out: Path, quantize: str | None) -> Exported:
    """Merge the run's method, write `model.gguf` (f16 unless `quantize` is q8_0) and the `Modelfile`
    into `out`, read the file back with transformers and measure it against `probe`."""
    kind = quantize or "f16"
    model: Any = trained.model
    trained.method.merge(model)
    model.eval()
    decoder: Any = base_decoder(model.backbone)
    tied = model.lm_head.weight is decoder.get_input_embeddings().weight
    tokenizer: Any = trained.objective.tokenizer
    chat = _chat_template(trained)
    stats = _write_gguf(out / FILE, trained, decoder, None if tied else model.lm_head, chat, kind)
    name = _ollama_name(trained.config.model.name)
    template = modelfile(tokenizer, chat, [tokenizer.convert_ids_to_tokens(i) for i in probe.eos], FILE)
    (out / "Modelfile").write_text(template.text, encoding="utf-8")
    exported = _read_back(probe, out, kind)
    exported.details.update(
        tensor_types=stats["types"],
        tied_embeddings=tied,
        tokenizer_pre=stats["pre"],
        chat_format=template.format,
        reader="transformers' GGUF reader, dequantized to fp32 (llama.cpp itself not run)",
    )
    if stats["f16_fallback"]:
        exported.details["kept_in_f16"] = stats["f16_fallback"]
    exported.load_hint = (
        f"ollama create {name} -f Modelfile   # in the export directory; then: ollama run {name}\n"
        f"llama-cli -m {FILE} -cnv   # llama.cpp; llama-server -m {FILE} serves an OpenAI-compatible API"
    )
    return exported


# --- what llama.cpp's llama holds -------------------------------------------------------------------
def _llama_refusal(config: Any) -> str | None:
    if config.model_type != "llama":
        return f"GGUF export writes llama.cpp's llama architecture, and this is a {config.model_type} model"
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        return f"rope scaling {rope.get('rope_type')!r} is not written (llama.cpp needs its rope_freqs tensor)"
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        return "the model has attention or MLP biases, which transformers' GGUF reader drops"
    if config.hidden_act != "silu":
        return f"llama.cpp's llama uses SiLU, and this model uses {config.hidden_act}"
    return None


def _tokenizer_refusal(tokenizer: Any, vocab_size: int) -> str | None:
    spec = _tokenizer_json(tokenizer)
    if spec is None or spec["model"].get("type") != "BPE" or _pre_tokenizer(spec) is None:
        return (
            "GGUF export writes byte-level BPE tokenizers that split text as GPT-2, SmolLM or Llama 3 do "
            "(llama.cpp's gpt-2, smollm, llama-bpe), and this tokenizer is another kind"
        )
    if not spec["model"].get("merges"):
        return "the tokenizer has no BPE merges, and llama.cpp cannot load a BPE vocabulary without them"
    if len(tokenizer) > vocab_size:
        return f"the tokenizer has {len(tokenizer)} tokens and the model's embedding only {vocab_size}"
    return None


def _tokenizer_json(tokenizer: Any) -> dict[str, Any] | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return None if backend is None else json.loads(backend.to_str())  # type: ignore[no-any-return]


def _pre_tokenizer(spec: dict[str, Any]) -> str | None:
    """llama.cpp's name (`tokenizer.ggml.pre`) for how the tokenizer splits text before BPE."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre])
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and steps[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT:
        return "llama-bpe"
    return None


# --- writing the file -------------------------------------------------------------------------------
def _write_gguf(
    path: Path, trained: Trained, decoder: Any, lm_head: Any, chat: str | None, kind: str
) -> dict[str, Any]:
    """Write the GGUF; what went in (tensor types, pre-tokenizer, tensors kept in f16)."""
    import gguf

    config = decoder.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"{Path(trained.config.model.name).stem} ({trained.method.name}, tunesmith)")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[kind]])
    if kind != "f16":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    pre = _add_tokenizer(writer, trained.objective.tokenizer, config.vocab_size, chat)
    types, fallback = _add_tensors(writer, decoder, lm_head, kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"types": types, "pre": pre, "f16_fallback": fallback}


def _rope_theta(config: Any) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_tokenizer(writer: Any, tokenizer: Any, vocab_size: int, chat: str | None) -> str:
    """The `tokenizer.ggml.*` keys (as convert_hf_to_gguf.py's gpt2 vocabulary) and the chat template."""
    from gguf import TokenType

    spec = _tokenizer_json(tokenizer)
    assert spec is not None, "check() refused tokenizers without a tokenizers backend"
    pre = _pre_tokenizer(spec)
    assert pre is not None, "check() refused pre-tokenizers llama.cpp has no name for"
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):  # an embedding wider than the vocabulary gets unused padding tokens
        if i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id.get(i, f"[PAD{i}]"))
            types.append(TokenType.NORMAL if i in by_id else TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    for key, value in (
        ("bos", tokenizer.bos_token_id),
        ("eos", tokenizer.eos_token_id),
        ("unk", tokenizer.unk_token_id),
        ("pad", tokenizer.pad_token_id),
    ):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    probe = tokenizer("a")["input_ids"]  # what the tokenizer adds around text, as llama.cpp will
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if chat:
        writer.add_chat_template(chat)
    return pre


def _add_tensors(writer: Any, decoder: Any, lm_head: Any, kind: str) -> tuple[dict[str, int], list[str]]:
    """Every weight under its llama.cpp name, q/k permuted; the count per type, and matrices kept in f16."""
    import gguf

    config = decoder.config
    heads = config.num_attention_heads
    kv_heads = config.num_key_value_heads or heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = {f"model.{key}": value for key, value in decoder.state_dict().items()}
    if lm_head is not None:
        state["lm_head.weight"] = lm_head.weight
    counts: dict[str, int] = {}
    fallback = []
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConfigError(f"the weight {hf_name} has no place in llama.cpp's llama; export it with --format hf")
        data = tensor.detach().float().cpu().numpy()  # (out, in) for a matrix
        if name.endswith("attn_q.weight"):
            data = permute_qk(data, heads)
        elif name.endswith("attn_k.weight"):
            data = permute_qk(data, kv_heads)
        qtype = _tensor_type(data, kind)
        if data.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16 and kind != "f16":
            fallback.append(name)
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts, fallback


def permute_qk(weight: Any, heads: int) -> Any:
    """q or k rows (heads * head_dim, in) from transformers' half-split rotary layout to llama.cpp's
    adjacent pairs: per head, row i of the first half goes to 2i, row i of the second half to 2i + 1."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_type(data: Any, kind: str) -> Any:
    """f32 for vectors (norms); else the type --quantize asks for, or f16 where rows do not fill its blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim < 2:
        return GGMLQuantizationType.F32
    wanted = GGMLQuantizationType[_TYPES[kind]]
    return wanted if data.shape[-1] % GGML_QUANT_SIZES[wanted][0] == 0 else GGMLQuantizationType.F16


# --- chat template and Modelfile --------------------------------------------------------------------
def _chat_template(trained: Trained) -> str | None:
    """The chat template the run renders prompts with (None: prompts are plain text)."""
    tokenizer: Any = trained.objective.tokenizer
    if resolve_template(tokenizer, trained.config.data.template) != "chat":
        return None
    own = getattr(tokenizer, "chat_template", None)
    return own if isinstance(own, str) else FALLBACK_CHAT_TEMPLATE


def _ollama_name(model: str) -> str:
    stem = re.sub(r"[^a-z0-9._-]+", "-", Path(model).stem.lower()).strip("-.") or "model"
    return f"{stem}-tuned"


# --- parity -----------------------------------------------------------------------------------------
def _read_back(probe: Probe, out: Path, kind: str) -> Exported:
    from transformers import AutoModelForCausalLM

    started = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(out, gguf_file=FILE, dtype=torch.float32).eval()
    load = time.perf_counter() - started
    inputs = {k: probe.inputs[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = hf(**inputs).logits
        generations = [greedy(hf, prompt, probe) for prompt in probe.prompts]
        latency = median_seconds(lambda: hf(**inputs), repeats=3) / probe.rows
    scale = max(1.0, float(probe.logits.abs().max()))
    tolerance = TOLERANCE[kind] * scale
    note = (
        f"{kind} weights (norms f32) read back dequantized to fp32; tolerance {TOLERANCE[kind]:g} x the largest "
        f"|logit| ({scale:.3g}); {GENERATION_RULE}; same argmax counted where the trained model's top logit "
        "leads its runner-up by more than 2 x tolerance"
    )
    parity = compare(probe, logits, tolerance, generations, note)
    decided, positions = parity.decided
    details = {
        "generation_rule": GENERATION_RULE,
        "same_argmax_all_positions": parity.same_argmax_all,
        "positions_decided_beyond_2x_tolerance": f"{decided} of {positions}",
    }
    return Exported("gguf", out, parity, load, latency * 1000, "", quantize=kind, details=details)
