"""Shared fixtures: tiny models built in-process and small data files. No network, ever."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "fine", "lovely", "superb", "moving", "funny", "smart"]
NEGATIVE = ["bad", "awful", "dull", "boring", "weak", "messy", "flat", "tired"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "actors", "really", "quite", "story", "and", "it"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *POSITIVE, *NEGATIVE, *FILLER]


def make_tiny_bert(path: Path, layers: int = 2, hidden: int = 32) -> Path:
    """A 2-layer BERT with a WordPiece tokenizer over a 33-word vocabulary, saved to `path`."""
    import torch
    from transformers import BertConfig, BertModel

    path.mkdir(parents=True, exist_ok=True)
    make_tiny_tokenizer().save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(path)
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Short reviews whose label is carried by one sentiment word among filler."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        words = [*rng.sample(FILLER, rng.randint(2, 6)), word]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def make_tiny_tokenizer():
    """A BERT-style WordPiece tokenizer over VOCAB, built locally with `tokenizers`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(VOCAB)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def make_tiny_byte_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer with no merges (one token per byte) and ChatML specials.

    As in SmolLM2, the pad token is the EOS token (`<|im_end|>`), so padding cannot be told from
    EOS by id. Ids: 0 `<|endoftext|>`, 1 `<|im_start|>`, 2 `<|im_end|>`, then the 256 byte symbols.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(alphabet)])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def make_tiny_llama(path: Path, layers: int = 2, hidden: int = 32, chat_template: str | None = CHATML) -> Path:
    """A 2-layer Llama (tied embeddings, as SmolLM2) with the byte tokenizer above, saved to `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_byte_tokenizer(chat_template)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def make_tiny_gpt2(path: Path, layers: int = 2, hidden: int = 32) -> Path:
    """A 2-layer GPT-2 (Conv1D linears, learned positions) with the byte tokenizer and no chat
    template, saved to `path`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tiny_byte_tokenizer(chat_template=None)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=hidden,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


ROOT = Path(__file__).parents[1]


class CliResult(NamedTuple):
    """What `tunesmith ARGS` did: its exit code, stdout and stderr."""

    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        """stdout and stderr as one line of words (rich wraps long lines to the terminal)."""
        return " ".join((self.out + self.err).split())


def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: object) -> CliResult:
    """Run `tunesmith ARGS` in-process as the entry point does."""
    import sys

    from tunesmith import cli

    monkeypatch.setattr(sys, "argv", ["tunesmith", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out = capsys.readouterr()
    return CliResult(code, out.out, out.err)


def run_tunesmith(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The installed `tunesmith` command in a subprocess, from the repository root, offline."""
    import sys

    command = Path(sys.executable).with_name("tunesmith")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [str(command), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """Tiny models run fastest on one thread, and a busy 2-core machine stops two from fighting."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture()
def sentiment_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "train.jsonl", sentiment_rows(96))


@pytest.fixture()
def base_config(tiny_bert: Path, sentiment_file: Path, tmp_path: Path) -> dict:
    """A fast classification run on the tiny BERT (override what a test varies)."""
    return {
        "model": str(tiny_bert),
        "method": "lora",
        "data": {"train": str(sentiment_file), "validation": 0.25, "max_length": 16},
        "train": {"epochs": 2, "batch_size": 8, "lr": 5e-3, "log_every": 2, "precision": "fp32"},
        "output": str(tmp_path / "runs"),
    }


def make_tiny_vit(path: Path, image_size: int = 16) -> Path:
    """A 2-layer ViT (hidden 32, 4x4 patches) with a ViT-style preprocessor config, saved to `path`."""
    import torch
    from transformers import ViTConfig, ViTModel

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=image_size,
        patch_size=4,
    )
    ViTModel(config).save_pretrained(path)
    processor = {"size": {"height": image_size, "width": image_size}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


def make_tiny_resnet(path: Path, image_size: int = 16) -> Path:
    """A 2-stage ResNet (batch norms included) with a ConvNeXt-style processor config, saved to `path`."""
    import torch
    from transformers import ResNetConfig, ResNetModel

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    ResNetModel(config).save_pretrained(path)
    processor = {
        "size": {"shortest_edge": image_size},
        "crop_pct": 1.0,
        "image_mean": [0.5] * 3,
        "image_std": [0.25] * 3,
    }
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


def make_tiny_convnext(path: Path, image_size: int = 16) -> Path:
    """A 2-stage ConvNeXt (depthwise 7x7 convs, layer norms), saved to `path` without a processor
    config (ViT-style defaults apply)."""
    import torch
    from transformers import ConvNextConfig, ConvNextModel

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], patch_size=2, image_size=image_size)
    ConvNextModel(config).save_pretrained(path)
    return path


def write_halves_npz(path: Path, n: int = 48, size: int = 16, seed: int = 0) -> Path:
    """RGB images whose class is the brighter half: `top` or `bottom` (plus noise), as .npz arrays."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    labels = np.array(["top" if i % 2 == 0 else "bottom" for i in range(n)])
    for i in range(n):
        rows = slice(0, size // 2) if labels[i] == "top" else slice(size // 2, size)
        images[i, rows] += 150
    np.savez(path, images=images, labels=labels)
    return path


def build_run_model(cfg, num_labels: int = 0):
    """The model, method and trained names exactly as a run builds them, through its plug-ins."""
    from tunesmith.build import build_model
    from tunesmith.plugins import build_method, build_task

    method = build_method(cfg.method)
    model, names = build_model(cfg, build_task(cfg), method, num_labels)
    return model, method, names


def run_tokenizer(cfg):
    """The tokenizer a run of `cfg` uses (None for images)."""
    from tunesmith.plugins import build_task

    return build_task(cfg).load_tokenizer()


def run_objective(cfg, labels: tuple[str, ...] | list[str] = ()):
    """The objective a run of `cfg` trains, with its tokenizer and `labels`."""
    from tunesmith.plugins import build_task

    task = build_task(cfg)
    return task.objective(task.load_tokenizer(), list(labels))


def row_checks(task: str, data):
    """The streamed data gate's checks of a task that checks rows one by one (classification, sft)."""
    from tunesmith.tasks.classification import ClassificationRows
    from tunesmith.tasks.sft.checks import SftRows

    return {"classification": ClassificationRows, "sft": SftRows}[task](data)


def check_task_rows(rows, data, task: str, tokenizer=None, reference=None, source: str = "rows"):
    """`data.quality.check_rows` with `task`'s row checks."""
    from tunesmith.data.quality import check_rows

    return check_rows(rows, data, row_checks(task, data), tokenizer, reference, source)


def check_task_file(path, data, task: str, tokenizer=None, references=()):
    """`data.quality.check_file` with `task`'s row checks."""
    from tunesmith.data.quality import check_file

    return check_file(path, data, row_checks(task, data), tokenizer, references)


def clean_task_file(path, out, data, task: str, tokenizer=None, references=()):
    """`data.quality.clean_file` with `task`'s row checks."""
    from tunesmith.data.quality import clean_file

    return clean_file(path, out, data, row_checks(task, data), tokenizer, references)


class Interrupt(Exception):
    """Stands in for a kill: raised from a step callback, nothing is saved on the way out."""


def stop_at(stop_step: int):
    """A step callback that interrupts training after step `stop_step`."""

    def callback(step: int, record: dict) -> None:
        if step == stop_step:
            raise Interrupt

    return callback


def final_weights(run_dir: Path) -> dict:
    """A finished run's trainable weights."""
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "trainable.safetensors"))


class Resumed(NamedTuple):
    """A run trained whole, and the same run interrupted and resumed (an exact resume ends equal)."""

    whole: object  # tunesmith.api.RunResult
    resumed: object

    @property
    def weights(self) -> tuple[dict, dict]:
        """The final trainable weights of both runs."""
        return final_weights(self.whole.run_dir), final_weights(self.resumed.run_dir)  # type: ignore[attr-defined]


def interrupt_and_resume(tmp_path: Path, stop_step: int, before_resume=None, **config: object) -> Resumed:
    """Train `config` whole (under tmp_path/whole), and again (under tmp_path/broken) interrupted after
    step `stop_step`, then resumed; `before_resume(run_dir)` sees the interrupted run first."""
    import tunesmith

    whole = tunesmith.train(output=str(tmp_path / "whole"), **config)
    with pytest.raises(Interrupt):
        tunesmith.train(output=str(tmp_path / "broken"), callbacks=[stop_at(stop_step)], **config)
    (broken,) = (tmp_path / "broken").iterdir()
    if before_resume is not None:
        before_resume(broken)
    return Resumed(whole, tunesmith.train(broken / "config.yaml", resume=broken))
