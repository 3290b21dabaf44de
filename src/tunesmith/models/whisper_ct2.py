"""Use a CTranslate2 Whisper model as a transformers `WhisperForConditionalGeneration`: convert it once.

The packaged Whisper tiny.en (DESIGN §12) ships as a CTranslate2 directory: `model.bin`,
`config.json` (suppressed and alignment ids), `tokenizer.json`. `model.bin` is read here by hand
with `struct`, not with the `ctranslate2` package: its runtime is a 100+ MB C++ wheel that would
only be needed to read one file, and the layout is short (little-endian, format version 6):

    u32 version, string spec, u32 revision, u32 n_vars,
    n_vars x (string name, u8 rank, rank x u32 shape, u8 dtype, u32 n_bytes, n_bytes of data),
    u32 n_aliases, n_aliases x (string alias, string name)       # and nothing after

where a string is a u16 length (counting a trailing NUL) and its bytes. The converted directory
(config, fp32 `model.safetensors`, generation config, tokenizer, feature extractor) is cached under
`cache_root()/models/whisper-ct2-<sha256 of model.bin[:16]>/` as GGUF conversions are
(`tunesmith.models.convert_cache`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunesmith.errors import ConfigError
from tunesmith.models.convert_cache import build_once, cache_root, file_sha256

if TYPE_CHECKING:
    import numpy as np
    import torch

__all__ = ["Ct2Model", "convert_ct2_whisper", "is_ct2_whisper_dir", "read_ct2_model", "whisper_state_dict"]

FORMAT_VERSION = 6
WHISPER_SPEC = "WhisperSpec"
_HASH_SIDECAR = "ct2-sha256.json"
# CTranslate2's DataType ids: numpy dtype and bytes per value (bfloat16 is read as uint16 bits)
_DTYPES = {0: ("<f4", 4), 1: ("i1", 1), 2: ("<i2", 2), 3: ("<i4", 4), 4: ("<f2", 2), 5: ("<u2", 2)}
_FLOAT_DTYPES = {0, 4, 5}
# OpenAI's own test (whisper/model.py, `is_multilingual`): English-only checkpoints have 51864 ids
_MULTILINGUAL_VOCAB = 51865


@dataclass(frozen=True)
class Ct2Model:
    """The contents of a CTranslate2 `model.bin`: float variables as float32, integer ones as stored."""

    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]


def convert_ct2_whisper(model_dir: str | Path, root: Path | None = None) -> Path:
    """The transformers Whisper directory for the CTranslate2 Whisper model in `model_dir`, converting it once.

    Args:
        model_dir: a directory with `model.bin` (a CTranslate2 `WhisperSpec`), `config.json` and
            `tokenizer.json`.
        root: the cache root (default `cache_root()`).

    Returns:
        `root/models/whisper-ct2-<first 16 hex of model.bin's sha256>/`, loadable with
        `WhisperForConditionalGeneration.from_pretrained` and `WhisperProcessor.from_pretrained`.

    Raises:
        ConfigError: a file is missing or malformed; the message names the file and the problem.
    """
    directory = Path(model_dir).expanduser().absolute()
    model_bin = directory / "model.bin"
    for name in ("model.bin", "config.json", "tokenizer.json"):
        if not (directory / name).is_file():
            raise ConfigError(f"{directory / name}: no such file; a CTranslate2 Whisper directory holds {name}")
    root = cache_root() if root is None else root
    sha256 = file_sha256(model_bin, root / _HASH_SIDECAR)
    target = root / "models" / f"whisper-ct2-{sha256[:16]}"
    return build_once(
        target,
        {"source": str(model_bin), "sha256": sha256},
        lambda out: _write_transformers_model(directory, out),
        f"converting {model_bin} to a transformers Whisper model once; cached in {target}",
    )


def is_ct2_whisper_dir(directory: Path) -> bool:
    """Whether `directory` holds a CTranslate2 Whisper model: `config.json` beside a `model.bin` whose
    header names the `WhisperSpec` (read from the first bytes only)."""
    model_bin = directory / "model.bin"
    if not (directory / "config.json").is_file() or not model_bin.is_file():
        return False
    spec = _ct2_string(WHISPER_SPEC)
    with model_bin.open("rb") as fh:
        head = fh.read(4 + len(spec))  # u32 version, then the spec name
    return head[4:] == spec


def read_ct2_model(path: Path) -> Ct2Model:
    """Parse a CTranslate2 `model.bin` (format version 6), which must be consumed exactly.

    Raises:
        ConfigError: the file is truncated, has trailing bytes, an unknown dtype or version, or a
            variable whose byte count does not match its shape.
    """
    import numpy as np

    cursor = _Cursor(path.read_bytes(), path)
    (version,) = cursor.unpack("<I", "the format version")
    if version != FORMAT_VERSION:
        raise ConfigError(f"{path}: CTranslate2 format version {version}; only version {FORMAT_VERSION} is read")
    spec = cursor.string("the spec name")
    (revision, n_vars) = cursor.unpack("<II", "the header")
    variables: dict[str, np.ndarray] = {}
    for index in range(n_vars):
        name = cursor.string(f"the name of variable {index}")
        (rank,) = cursor.unpack("<B", f"the rank of {name}")
        shape = cursor.unpack(f"<{rank}I", f"the shape of {name}")
        dtype, n_bytes = cursor.unpack("<BI", f"the dtype of {name}")
        if dtype not in _DTYPES:
            raise ConfigError(f"{path}: {name} has unknown dtype id {dtype} (known: 0-5)")
        numpy_dtype, width = _DTYPES[dtype]
        count = int(np.prod(shape, dtype=np.int64))
        if n_bytes != count * width:
            raise ConfigError(f"{path}: {name} holds {n_bytes} bytes, but shape {list(shape)} needs {count * width}")
        values = np.frombuffer(cursor.take(n_bytes, f"the data of {name}"), dtype=numpy_dtype).reshape(shape)
        variables[name] = _as_float32(values, dtype) if dtype in _FLOAT_DTYPES else values.copy()
    (n_aliases,) = cursor.unpack("<I", "the alias count")
    aliases = {cursor.string("an alias"): cursor.string("an aliased name") for _ in range(n_aliases)}
    if cursor.remaining:
        raise ConfigError(f"{path}: {cursor.remaining} bytes left after the last alias; the file is corrupt")
    return Ct2Model(spec, revision, variables, aliases)


def whisper_state_dict(model: Ct2Model, where: Path) -> dict[str, torch.Tensor]:
    """The transformers `WhisperForConditionalGeneration` state dict of a CTranslate2 `WhisperSpec`.

    Stacked projections are split: self-attention q,k,v and cross-attention k,v. CTranslate2 stores
    zeros for the key bias that Whisper lacks; it is dropped (any constant key bias would only shift
    every score of a query equally, which softmax ignores). The output projection is the embedding.

    Raises:
        ConfigError: a tensor is missing, quantized, or left over (not a Whisper this code knows).
    """
    weights = _Weights(model, where)
    state: dict[str, torch.Tensor] = {}
    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        state[f"{hf}.embed_positions.weight"] = weights.take(f"{side}/position_encodings/encodings")
        state |= weights.norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        for i in range(_count_layers(model, side, where)):
            ct2, layer = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            state |= weights.split(f"{ct2}/self_attention/linear_0", [f"{layer}.self_attn.{p}_proj" for p in "qkv"])
            state |= weights.linear(f"{ct2}/self_attention/linear_1", f"{layer}.self_attn.out_proj")
            state |= weights.norm(f"{ct2}/self_attention/layer_norm", f"{layer}.self_attn_layer_norm")
            state |= weights.linear(f"{ct2}/ffn/linear_0", f"{layer}.fc1")
            state |= weights.linear(f"{ct2}/ffn/linear_1", f"{layer}.fc2")
            state |= weights.norm(f"{ct2}/ffn/layer_norm", f"{layer}.final_layer_norm")
            if side == "decoder":
                cross = f"{layer}.encoder_attn"
                state |= weights.linear(f"{ct2}/attention/linear_0", f"{cross}.q_proj")
                state |= weights.split(f"{ct2}/attention/linear_1", [f"{cross}.k_proj", f"{cross}.v_proj"])
                state |= weights.linear(f"{ct2}/attention/linear_2", f"{cross}.out_proj")
                state |= weights.norm(f"{ct2}/attention/layer_norm", f"{layer}.encoder_attn_layer_norm")
    for conv in ("conv1", "conv2"):
        state |= weights.linear(f"encoder/{conv}", f"model.encoder.{conv}")
    embeddings = weights.take("decoder/embeddings/weight")  # (vocab, d_model)
    state["model.decoder.embed_tokens.weight"] = state["proj_out.weight"] = embeddings
    weights.check_projection_is_tied(embeddings)
    weights.check_all_used()
    return state


def _write_transformers_model(directory: Path, out: Path) -> None:
    """Convert the CTranslate2 Whisper in `directory` and save model, tokenizer and feature extractor in `out`."""
    import torch
    from transformers import GenerationConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    model_bin = directory / "model.bin"
    ct2 = read_ct2_model(model_bin)
    if ct2.spec != WHISPER_SPEC:
        raise ConfigError(f"{model_bin}: a CTranslate2 {ct2.spec} model, not a {WHISPER_SPEC}")
    state = whisper_state_dict(ct2, model_bin)
    config, generation = _whisper_configs(ct2, state, directory)
    with torch.device("meta"):  # no random init: every weight is assigned below
        model = WhisperForConditionalGeneration(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # size mismatches, e.g. q,k,v rows that are not 3 x d_model
        problem = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
        problem = problem if len(problem) <= 200 else problem[:200] + "..."
        raise ConfigError(f"{model_bin}: tensors do not fit a Whisper model ({problem})") from None
    model.tie_weights()
    model.generation_config = GenerationConfig(**generation)
    model.eval()
    model.save_pretrained(out)
    _load_tokenizer(directory / "tokenizer.json").save_pretrained(out)
    WhisperFeatureExtractor(feature_size=config.num_mel_bins).save_pretrained(out)


def _whisper_configs(ct2: Ct2Model, state: dict[str, torch.Tensor], directory: Path) -> tuple[Any, dict[str, Any]]:
    """The `WhisperConfig` (sizes from tensor shapes, heads from the `num_heads` scalars) and the
    generation settings (special ids from `tokenizer.json`, suppressed ids from CTranslate2's `config.json`)."""
    from transformers import WhisperConfig

    model_bin, tokenizer_json = directory / "model.bin", directory / "tokenizer.json"
    d_model, mel_bins, _ = state["model.encoder.conv1.weight"].shape  # (d_model, mel bins, kernel 3)
    vocab = state["proj_out.weight"].shape[0]
    tokens = _added_tokens(tokenizer_json)
    names = ("endoftext", "startoftranscript", "notimestamps")
    ids = {name: _token_id(tokens, name, vocab, tokenizer_json) for name in names}
    try:
        generation = _generation_settings(tokens, ids, vocab, _read_json_object(directory / "config.json"))
    except (TypeError, ValueError) as exc:  # e.g. suppress_ids that are not integers
        raise ConfigError(f"{directory / 'config.json'}: malformed ids ({_first_line(exc)})") from None
    config = WhisperConfig(
        vocab_size=vocab,
        num_mel_bins=mel_bins,
        d_model=d_model,
        encoder_layers=_count_layers(ct2, "encoder", model_bin),
        decoder_layers=_count_layers(ct2, "decoder", model_bin),
        encoder_attention_heads=_num_heads(ct2, "encoder", d_model, model_bin),
        decoder_attention_heads=_num_heads(ct2, "decoder", d_model, model_bin),
        encoder_ffn_dim=state["model.encoder.layers.0.fc1.weight"].shape[0],
        decoder_ffn_dim=state["model.decoder.layers.0.fc1.weight"].shape[0],
        max_source_positions=state["model.encoder.embed_positions.weight"].shape[0],
        max_target_positions=state["model.decoder.embed_positions.weight"].shape[0],
        bos_token_id=ids["endoftext"],
        eos_token_id=ids["endoftext"],
        pad_token_id=ids["endoftext"],
        decoder_start_token_id=ids["startoftranscript"],
        suppress_tokens=generation.get("suppress_tokens"),
        begin_suppress_tokens=generation.get("begin_suppress_tokens"),
        tie_word_embeddings=True,
        architectures=["WhisperForConditionalGeneration"],
    )
    generation["max_length"] = config.max_target_positions
    return config, generation


def _generation_settings(
    tokens: dict[str, int], ids: dict[str, int], vocab: int, ct2_config: dict[str, Any]
) -> dict[str, Any]:
    """Whisper's generation config. The prompt transformers builds is decoder_start, then (multilingual
    only) the language and task, then no-timestamps; `forced_decoder_ids` is left out: transformers 5
    builds the same prompt from these ids and warns that the old flag is deprecated."""
    settings: dict[str, Any] = {
        "decoder_start_token_id": ids["startoftranscript"],
        "bos_token_id": ids["endoftext"],
        "eos_token_id": ids["endoftext"],
        "pad_token_id": ids["endoftext"],
        "no_timestamps_token_id": ids["notimestamps"],
        "is_multilingual": vocab >= _MULTILINGUAL_VOCAB,
        "return_timestamps": False,
        "max_initial_timestamp_index": 50,  # 1 s: OpenAI's default first-timestamp limit
    }
    if "<|startofprev|>" in tokens:
        settings["prev_sot_token_id"] = tokens["<|startofprev|>"]
    for ours, theirs in (("suppress_tokens", "suppress_ids"), ("begin_suppress_tokens", "suppress_ids_begin")):
        if isinstance(ct2_config.get(theirs), list):
            settings[ours] = [int(i) for i in ct2_config[theirs] if int(i) < vocab]
    if isinstance(ct2_config.get("alignment_heads"), list):
        settings["alignment_heads"] = [[int(layer), int(head)] for layer, head in ct2_config["alignment_heads"]]
    translate, transcribe = tokens.get("<|translate|>"), tokens.get("<|transcribe|>")
    if settings["is_multilingual"] and translate is not None and transcribe is not None:
        # the language tokens sit between <|startoftranscript|> and <|translate|>
        settings["lang_to_id"] = {t: i for t, i in tokens.items() if ids["startoftranscript"] < i < translate}
        settings["task_to_id"] = {"transcribe": transcribe, "translate": translate}
        settings["task"] = "transcribe"  # the language is detected unless generate() is given one
    return settings


def _load_tokenizer(path: Path) -> Any:
    """`WhisperTokenizer` over `tokenizer.json`, padding with <|endoftext|> as OpenAI's checkpoints do."""
    from transformers import WhisperTokenizer

    try:
        return WhisperTokenizer(tokenizer_file=str(path), pad_token="<|endoftext|>")
    except Exception as exc:  # tokenizers raises its own Exception subclass for a malformed file
        raise ConfigError(f"{path}: not a tokenizer transformers can read ({_first_line(exc)})") from None


def _added_tokens(path: Path) -> dict[str, int]:
    """The special tokens of a `tokenizer.json` by text (Whisper's ids are looked up here, not guessed)."""
    added = _read_json_object(path).get("added_tokens")
    if not isinstance(added, list):
        raise ConfigError(f"{path}: no added_tokens list; not a Hugging Face tokenizer.json")
    return {t["content"]: int(t["id"]) for t in added if isinstance(t, dict) and "content" in t and "id" in t}


def _token_id(tokens: dict[str, int], name: str, vocab: int, where: Path) -> int:
    token = f"<|{name}|>"
    if token not in tokens or not 0 <= tokens[token] < vocab:
        raise ConfigError(f"{where}: no special token {token} below the model's {vocab} ids; not a Whisper tokenizer")
    return tokens[token]


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable JSON ({_first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _count_layers(model: Ct2Model, side: str, where: Path) -> int:
    count = 0
    while f"{side}/layer_{count}/ffn/linear_0/weight" in model.variables:
        count += 1
    if not count:
        raise ConfigError(f"{where}: no tensor {side}/layer_0/ffn/linear_0/weight; not a Whisper model")
    return count


def _num_heads(model: Ct2Model, side: str, d_model: int, where: Path) -> int:
    value = model.variables.get(f"{side}/num_heads")
    if value is None or value.ndim != 0 or value.dtype.kind != "i" or int(value) <= 0 or d_model % int(value):
        raise ConfigError(f"{where}: {side}/num_heads must be an integer scalar dividing d_model={d_model}")
    return int(value)


def _as_float32(values: np.ndarray, dtype: int) -> np.ndarray:
    """A float32 copy of float32, float16 or bfloat16 (uint16 bits) values; each converts exactly."""
    import numpy as np

    if dtype == 5:  # bfloat16 is the top half of a float32
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32)


def _ct2_string(text: str) -> bytes:
    """A string as CTranslate2 writes it: u16 length (counting the NUL), the bytes, NUL."""
    raw = text.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Cursor:
    """Reads a file's bytes front to back; running past the end is a ConfigError naming the file."""

    def __init__(self, data: bytes, path: Path) -> None:
        self.data, self.path, self.offset = memoryview(data), path, 0

    @property
    def remaining(self) -> int:
        return len(self.data) - self.offset

    def take(self, n: int, what: str) -> memoryview:
        if n > self.remaining:
            raise ConfigError(
                f"{self.path}: truncated: it ends inside {what} (byte {self.offset} of {len(self.data)}, "
                f"{n} more needed); not a complete CTranslate2 model"
            )
        self.offset += n
        return self.data[self.offset - n : self.offset]

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def string(self, what: str) -> str:
        (length,) = self.unpack("<H", what)
        raw = bytes(self.take(length, what))
        if not raw.endswith(b"\0"):
            raise ConfigError(f"{self.path}: {what} at byte {self.offset - length} is not NUL-terminated; corrupt")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{self.path}: {what} at byte {self.offset - length} is not UTF-8; corrupt") from None


class _Weights:
    """Hands out a CTranslate2 model's tensors as float32 torch tensors, remembering which were used."""

    def __init__(self, model: Ct2Model, where: Path) -> None:
        self.model, self.where, self.used = model, where, set[str]()

    def take(self, name: str) -> torch.Tensor:
        import torch

        values = self.model.variables.get(name)
        if values is None:
            raise ConfigError(f"{self.where}: no tensor {name}; not a Whisper model this converter reads")
        if values.dtype.kind != "f":
            raise ConfigError(
                f"{self.where}: {name} is {values.dtype} (quantized); convert the model again with "
                "`ct2-transformers-converter --quantization float32` (or float16)"
            )
        self.used.add(name)
        return torch.from_numpy(values)

    def linear(self, ct2: str, hf: str) -> dict[str, torch.Tensor]:
        return {f"{hf}.weight": self.take(f"{ct2}/weight"), f"{hf}.bias": self.take(f"{ct2}/bias")}

    def norm(self, ct2: str, hf: str) -> dict[str, torch.Tensor]:
        return {f"{hf}.weight": self.take(f"{ct2}/gamma"), f"{hf}.bias": self.take(f"{ct2}/beta")}

    def split(self, ct2: str, hf: list[str]) -> dict[str, torch.Tensor]:
        """Rows of a stacked projection, one equal block per name; the key's bias is dropped."""
        weight, bias = self.take(f"{ct2}/weight"), self.take(f"{ct2}/bias")  # (n x d, d), (n x d,)
        if weight.shape[0] % len(hf) or bias.shape != weight.shape[:1]:
            raise ConfigError(f"{self.where}: {ct2} has shape {list(weight.shape)}; expected {len(hf)} stacked blocks")
        rows = weight.shape[0] // len(hf)
        state: dict[str, torch.Tensor] = {}
        for index, name in enumerate(hf):
            block = slice(index * rows, (index + 1) * rows)
            state[f"{name}.weight"] = weight[block].clone()  # clone: safetensors refuses shared storage
            if not name.endswith("k_proj"):
                state[f"{name}.bias"] = bias[block].clone()
        return state

    def check_projection_is_tied(self, embeddings: torch.Tensor) -> None:
        """The output projection must be the embedding (an alias, or an equal copy), as in Whisper."""
        import torch

        name = "decoder/projection/weight"
        if self.model.aliases.get(name, "decoder/embeddings/weight") != "decoder/embeddings/weight":
            raise ConfigError(f"{self.where}: {name} aliases {self.model.aliases[name]}, not the embeddings")
        if name in self.model.variables and not torch.equal(self.take(name), embeddings):
            raise ConfigError(f"{self.where}: {name} differs from the embeddings; Whisper ties them")

    def check_all_used(self) -> None:
        """Every tensor (rank > 0) must have a place: a leftover one means a model this code misreads."""
        left = sorted(n for n, v in self.model.variables.items() if v.ndim > 0 and n not in self.used)
        if left:
            raise ConfigError(f"{self.where}: unexpected tensor {left[0]} ({len(left)} unused); not a Whisper model")
