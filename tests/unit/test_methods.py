"""The method x invariant matrix (DESIGN §4) on the tiny 2-layer BERT from conftest.

Every method: trainable weights move and frozen ones do not; the trainable-parameter count matches
a hand computation; adapters start as the identity; trained weights round-trip through a file and
load strictly; an adapter that never trained is reported; each method trains end to end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel

import tunesmith
from conftest import VOCAB, sentiment_rows
from tunesmith import registry
from tunesmith.config import ModelConfig
from tunesmith.errors import ConfigError
from tunesmith.methods import method_descriptions
from tunesmith.methods.adapter import AdapterConfig
from tunesmith.methods.freeze import FeatureExtractionConfig, PartialConfig
from tunesmith.methods.full import FullConfig
from tunesmith.methods.ia3 import IA3Config
from tunesmith.methods.lora import LoraConfig
from tunesmith.methods.prompt import PrefixTuningConfig, PromptTuningConfig
from tunesmith.models.classifier import TextClassifier
from tunesmith.models.load import build_classifier, load_tokenizer
from tunesmith.plugins import Method, build_method
from tunesmith.training.checkpoint import load_trainable, save_trainable

# One config per method, small enough to keep the arithmetic below readable.
CONFIGS: dict[str, BaseModel] = {
    "full": FullConfig(),
    "feature-extraction": FeatureExtractionConfig(),
    "partial": PartialConfig(freeze_layers=1),
    "lora": LoraConfig(r=8),
    "adapter": AdapterConfig(bottleneck=8),
    "prompt-tuning": PromptTuningConfig(num_virtual_tokens=5),
    "prefix-tuning": PrefixTuningConfig(num_virtual_tokens=5),
    "ia3": IA3Config(),
}
METHODS = list(CONFIGS)
# Options that change what a method adds, checked by the same invariants as the methods above.
VARIANTS: dict[str, BaseModel] = {
    "lora-dora": LoraConfig(r=8, use_dora=True),
    "lora-rslora": LoraConfig(r=8, use_rslora=True),
    "adapter-gelu": AdapterConfig(bottleneck=8, activation="gelu"),
    "prompt-tuning-text-init": PromptTuningConfig(num_virtual_tokens=5, init_text="good movie"),
    "prefix-tuning-projection": PrefixTuningConfig(num_virtual_tokens=5, projection=True),
}
CASES = {**CONFIGS, **VARIANTS}
# Methods whose added weights start as a no-op.
IDENTITY_AT_INIT = ["lora", "adapter", "ia3", "lora-dora", "lora-rslora", "adapter-gelu"]

# The tiny BERT of conftest.make_tiny_bert: its sizes, and parameter counts worked out by hand.
V, P, TYPES = len(VOCAB), 64, 2  # vocabulary, max_position_embeddings, token types
H, FF, LAYERS, LABELS = 32, 64, 2, 2  # hidden, intermediate, blocks, labels
HEAD = H * LABELS + LABELS
LAYER_NORM = 2 * H
EMBEDDINGS = V * H + P * H + TYPES * H + LAYER_NORM
ATTENTION = 4 * (H * H + H) + LAYER_NORM  # query, key, value, output dense + LayerNorm
FFN = (H * FF + FF) + (FF * H + H) + LAYER_NORM  # intermediate dense, output dense + LayerNorm
BLOCK = ATTENTION + FFN
BACKBONE = EMBEDDINGS + LAYERS * BLOCK  # build_classifier drops BERT's pooler
R, BOTTLENECK, VIRTUAL = 8, 8, 5
# LoRA on every block linear: A (r, in) and B (out, r) beside each.
LORA_PER_BLOCK = 4 * R * (H + H) + R * (H + FF) + R * (FF + H)
# Bottleneck after both output projections of each block: down (b, H) + b, up (H, b) + H.
ADAPTER_PER_BLOCK = 2 * ((H * BOTTLENECK + BOTTLENECK) + (BOTTLENECK * H + H))
# IA3: a vector on key and value outputs, and one on the FFN output projection's input.
IA3_PER_BLOCK = H + H + FF

# method -> (trainable parameters, parameters the method adds to the model)
EXPECTED_COUNTS: dict[str, tuple[int, int]] = {
    "full": (BACKBONE + HEAD, 0),
    "feature-extraction": (HEAD, 0),
    "partial": (BLOCK + HEAD, 0),  # freeze_layers=1: embeddings and block 0 frozen
    "lora": (LAYERS * LORA_PER_BLOCK + HEAD, LAYERS * LORA_PER_BLOCK),
    "adapter": (LAYERS * ADAPTER_PER_BLOCK + HEAD, LAYERS * ADAPTER_PER_BLOCK),
    "prompt-tuning": (VIRTUAL * H + HEAD, VIRTUAL * H),
    "prefix-tuning": (VIRTUAL * 2 * LAYERS * H + HEAD, VIRTUAL * 2 * LAYERS * H),  # key + value per layer
    "ia3": (LAYERS * IA3_PER_BLOCK + HEAD, LAYERS * IA3_PER_BLOCK),
}
# DoRA adds a magnitude per output feature of each adapted linear: q, k, v, o (H each), FFN in and out.
DORA_PER_BLOCK = LORA_PER_BLOCK + 4 * H + FF + H
# Projected prefixes: embeddings (n, H) -> Linear(H, H) -> tanh -> Linear(H, 2 * layers * H).
PROJECTED_PREFIX = VIRTUAL * H + (H * H + H) + (H * 2 * LAYERS * H + 2 * LAYERS * H)
EXPECTED_COUNTS |= {
    "lora-dora": (LAYERS * DORA_PER_BLOCK + HEAD, LAYERS * DORA_PER_BLOCK),
    "lora-rslora": EXPECTED_COUNTS["lora"],
    "adapter-gelu": EXPECTED_COUNTS["adapter"],
    "prompt-tuning-text-init": EXPECTED_COUNTS["prompt-tuning"],
    "prefix-tuning-projection": (PROJECTED_PREFIX + HEAD, PROJECTED_PREFIX),
}


# --- helpers --------------------------------------------------------------------------------------


def _build(tiny_bert: Path, cfg: BaseModel, seed: int = 0) -> tuple[TextClassifier, Method]:
    """The model and method as a run makes them (`tunesmith.build.build_model`, minus the task's checks)."""
    torch.manual_seed(seed)  # adapter weights that are not zero-initialised draw from the global RNG
    model = build_classifier(ModelConfig(name=str(tiny_bert)), LABELS, seed=0)
    method = build_method(cfg)
    method.apply(model)
    return model, method


def _trainable(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def _count(model: torch.nn.Module, trainable_only: bool) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def _block(name: str) -> int | None:
    """Which BERT block a parameter belongs to (None outside the blocks)."""
    parts = name.split(".")
    return int(parts[parts.index("layer") + 1]) if "layer" in parts else None


def _train_steps(
    model: TextClassifier, method: Method, batch: dict[str, torch.Tensor], steps: int = 5, lr: float = 1e-2
) -> None:
    """A few AdamW steps as the loop takes them: train mode, the method's own parameter groups."""
    optimizer = torch.optim.AdamW(method.param_groups(model, lr, lr, 0.01), lr=lr)
    model.train()
    for _ in range(steps):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        loss = F.cross_entropy(model(**inputs), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@torch.no_grad()
def _logits(model: TextClassifier, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


@pytest.fixture(scope="module")
def batch(tiny_bert: Path) -> dict[str, torch.Tensor]:
    """16 labelled reviews, padded: input_ids/attention_mask (16, T), labels (16,)."""
    rows = sentiment_rows(16, seed=1)
    tokenizer = load_tokenizer(ModelConfig(name=str(tiny_bert)))
    enc = tokenizer([r["text"] for r in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([int(r["label"] == "positive") for r in rows])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}


def test_matrix_covers_every_registered_method() -> None:
    assert set(CONFIGS) == set(registry.methods()) == set(method_descriptions())
    assert all(CONFIGS[name].name == name for name in CONFIGS)  # type: ignore[attr-defined]
    assert set(EXPECTED_COUNTS) == set(CASES)


# --- 1. trainable weights change, frozen ones do not ----------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_weights_change_and_frozen_do_not(name: str, tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    model, method = _build(tiny_bert, CASES[name])
    trainable = set(_trainable(model))
    # The optimizer sees exactly the trainable parameters (a frozen one in it would still decay).
    in_groups = {id(p) for g in method.param_groups(model, 1e-2, 1e-2, 0.01) for p in g["params"]}
    assert in_groups == {id(p) for n, p in model.named_parameters() if n in trainable}
    before = _snapshot(model)

    _train_steps(model, method, batch)

    after = _snapshot(model)
    unchanged = sorted(n for n in trainable if torch.equal(before[n], after[n]))
    moved = sorted(n for n in before if n not in trainable and not torch.equal(before[n], after[n]))
    assert not unchanged, f"trainable but never moved: {unchanged}"
    assert not moved, f"frozen but changed: {moved}"
    assert {"head.weight", "head.bias"} <= trainable
    if name == "full":
        assert trainable == set(before)


# --- 2. exact trainable-parameter counts ----------------------------------------------------------


def test_hand_counted_backbone_matches_the_tiny_bert(tiny_bert: Path) -> None:
    model = build_classifier(ModelConfig(name=str(tiny_bert)), LABELS, seed=0)
    assert _count(model, trainable_only=False) == BACKBONE + HEAD == 20386


@pytest.mark.parametrize("name", list(CASES))
def test_trainable_parameter_count_is_exact(name: str, tiny_bert: Path) -> None:
    model, _ = _build(tiny_bert, CASES[name])
    trainable, added = EXPECTED_COUNTS[name]
    assert _count(model, trainable_only=True) == trainable
    assert _count(model, trainable_only=False) == BACKBONE + HEAD + added


def test_lora_count_follows_chosen_targets(tiny_bert: Path) -> None:
    model, _ = _build(tiny_bert, LoraConfig(r=4, target_modules=["query", "value"]))
    assert _count(model, trainable_only=True) == LAYERS * 2 * 4 * (H + H) + HEAD
    assert all(".query." in n or ".value." in n or n.startswith("head.") for n in _trainable(model))


@pytest.mark.parametrize(("rslora", "scale"), [(False, 16 / 8), (True, 16 / math.sqrt(8))])
def test_lora_scaling_follows_the_config(rslora: bool, scale: float, tiny_bert: Path) -> None:
    model, _ = _build(tiny_bert, LoraConfig(r=8, alpha=16, use_rslora=rslora))
    scalings = [m.scaling["default"] for m in model.modules() if hasattr(m, "lora_A")]
    assert len(scalings) == LAYERS * 6
    assert all(math.isclose(s, scale) for s in scalings)


def test_prompt_init_text_starts_from_its_token_embeddings(tiny_bert: Path) -> None:
    base = build_classifier(ModelConfig(name=str(tiny_bert)), LABELS, seed=0)
    model, _ = _build(tiny_bert, CASES["prompt-tuning-text-init"])
    prompt = next(p for n, p in model.named_parameters() if "prompt_encoder" in n)
    # "[CLS] good movie [SEP]" repeated to fill the 5 virtual tokens.
    ids = [VOCAB.index(w) for w in ["[CLS]", "good", "movie", "[SEP]", "[CLS]"]]
    assert torch.equal(prompt, base.backbone.embeddings.word_embeddings.weight[ids])


# --- 3. identity at init --------------------------------------------------------------------------


@pytest.mark.parametrize("name", IDENTITY_AT_INIT)
def test_adapter_at_init_equals_the_base(name: str, tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    base = build_classifier(ModelConfig(name=str(tiny_bert)), LABELS, seed=0).eval()
    model, _ = _build(tiny_bert, CASES[name])
    model.eval()
    assert len(_trainable(model)) > 2  # something was added beside the head
    with torch.no_grad():
        want = base.encode(batch["input_ids"], batch["attention_mask"])
        got = model.encode(batch["input_ids"], batch["attention_mask"])
    assert want.shape == got.shape == (16, H)
    assert (want - got).abs().max().item() <= 1e-6


# --- 4. save / load round trip --------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_save_load_round_trip(name: str, tiny_bert: Path, batch: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model, method = _build(tiny_bert, CASES[name], seed=0)
    _train_steps(model, method, batch, steps=3)
    names = _trainable(model)
    path = tmp_path / "trainable.safetensors"
    save_trainable(model, names, path)
    want = _logits(model, batch)

    fresh, _ = _build(tiny_bert, CASES[name], seed=1)  # different RNG: loading must do all the work
    assert _trainable(fresh) == names
    assert not torch.allclose(_logits(fresh, batch), want)
    load_trainable(fresh, names, path)
    torch.testing.assert_close(_logits(fresh, batch), want, rtol=0, atol=1e-6)


# --- 5. missing or unexpected keys are an error ---------------------------------------------------


def test_lora_weights_do_not_load_into_an_adapter_model(tiny_bert: Path, tmp_path: Path) -> None:
    lora, _ = _build(tiny_bert, CONFIGS["lora"])
    path = tmp_path / "lora.safetensors"
    save_trainable(lora, _trainable(lora), path)
    adapter, _ = _build(tiny_bert, CONFIGS["adapter"])
    with pytest.raises(ConfigError, match=r"missing: .*adapter_down.*unexpected: .*lora_A"):
        load_trainable(adapter, _trainable(adapter), path)


def test_lora_weights_of_another_rank_do_not_load(tiny_bert: Path, tmp_path: Path) -> None:
    rank8, _ = _build(tiny_bert, LoraConfig(r=8))
    path = tmp_path / "lora.safetensors"
    save_trainable(rank8, _trainable(rank8), path)
    rank4, _ = _build(tiny_bert, LoraConfig(r=4))
    with pytest.raises(ConfigError, match=r"has shape \(8, 32\), the model wants \(4, 32\)"):
        load_trainable(rank4, _trainable(rank4), path)


# --- 6. an adapter that never trained is reported -------------------------------------------------


@pytest.mark.parametrize("name", IDENTITY_AT_INIT)
def test_noop_reason_until_trained(name: str, tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    model, method = _build(tiny_bert, CASES[name])
    reason = method.noop_reason(model)
    assert reason is not None and "never trained" in reason
    _train_steps(model, method, batch, steps=3)
    assert method.noop_reason(model) is None


# --- 7. targets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        LoraConfig(target_modules=["query", "nonexistent"]),
        AdapterConfig(target_modules=["nonexistent"]),
        IA3Config(target_modules=["nonexistent"]),
        IA3Config(feedforward_modules=["nonexistent"]),
    ],
    ids=["lora", "adapter", "ia3", "ia3-feedforward"],
)
def test_unknown_target_is_named(cfg: BaseModel, tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match=r"nonexistent match no linear (or conv )?layer of BertModel") as info:
        _build(tiny_bert, cfg)
    assert "query" not in str(info.value).split("(")[0]  # only the bad name is blamed


def test_partial_cannot_freeze_more_blocks_than_exist(tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match=r"freeze_layers=5: the model has only 2 blocks"):
        _build(tiny_bert, PartialConfig(freeze_layers=5))


def test_partial_regex_trains_only_what_it_matches(tiny_bert: Path) -> None:
    model, _ = _build(tiny_bert, PartialConfig(trainable_regex=r"layer\.1\."))
    every = [n for n, _ in model.named_parameters()]
    want = [n for n in every if _block(n) == 1 or n.startswith("head.")]
    assert _trainable(model) == want
    assert _count(model, trainable_only=True) == BLOCK + HEAD


@pytest.mark.parametrize("pattern", [r"layer\.7\.", r"layer\.(1"], ids=["matches-nothing", "invalid"])
def test_partial_bad_regex_is_an_error(pattern: str, tiny_bert: Path) -> None:
    with pytest.raises(ConfigError, match=r"method\.trainable_regex="):
        _build(tiny_bert, PartialConfig(trainable_regex=pattern))


# --- 8. gradual unfreezing ------------------------------------------------------------------------


def test_gradual_unfreezing_opens_one_block_per_epoch(tiny_bert: Path, batch: dict[str, torch.Tensor]) -> None:
    model, method = _build(tiny_bert, PartialConfig(freeze_layers=0, unfreeze_every=1))
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if n.startswith("head.")]
    other = [n for n in names if _block(n) is None and "embed" not in n and n not in head]  # none in BERT

    def in_blocks(*blocks: int) -> set[str]:
        return {n for n in names if _block(n) in blocks} | set(head) | set(other)

    # The optimizer is built once, before the first epoch, over everything that will ever train.
    optimizer = torch.optim.AdamW(method.param_groups(model, 1e-2, 1e-2, 0.0), lr=1e-2)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(in_blocks(0, 1))
    before = _snapshot(model)

    method.on_epoch_start(model, 0)
    assert set(_trainable(model)) == in_blocks(1)
    _step_with(model, optimizer, batch)
    moved = {n for n, p in _snapshot(model).items() if not torch.equal(p, before[n])}
    assert moved == in_blocks(1)

    method.on_epoch_start(model, 1)
    assert set(_trainable(model)) == in_blocks(0, 1)
    _step_with(model, optimizer, batch)
    moved = {n for n, p in _snapshot(model).items() if not torch.equal(p, before[n])}
    assert moved == in_blocks(0, 1)  # the embeddings stay frozen throughout

    method.on_epoch_start(model, 5)
    assert set(_trainable(model)) == in_blocks(0, 1)


def _step_with(model: TextClassifier, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    model.train()
    for _ in range(2):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        F.cross_entropy(logits, batch["labels"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


# --- 9. layer-wise LR decay -----------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [FullConfig(layer_lr_decay=0.5), PartialConfig(freeze_layers=0, layer_lr_decay=0.5)])
def test_layer_wise_lr_decay(cfg: BaseModel, tiny_bert: Path) -> None:
    model, method = _build(tiny_bert, cfg)
    lr, head_lr, wd = 1e-3, 5e-2, 0.01
    groups = method.param_groups(model, lr, head_lr, wd)
    group_of = {id(p): g for g in groups for p in g["params"]}
    params = list(model.named_parameters())
    assert sum(len(g["params"]) for g in groups) == len(group_of) == len(_trainable(model))

    for name, param in params:
        if not param.requires_grad:
            assert isinstance(cfg, PartialConfig) and "embeddings" in name
            continue
        group = group_of[id(param)]
        if name.startswith("head."):
            want = head_lr
        elif _block(name) == 1:
            want = lr
        elif _block(name) == 0:
            want = lr * 0.5
        else:
            assert "embeddings" in name, name
            want = lr * 0.25
        assert math.isclose(group["lr"], want, rel_tol=1e-12), name
        no_decay = param.ndim < 2 or "LayerNorm" in name
        assert group["weight_decay"] == (0.0 if no_decay else wd), name


# --- 10. end to end -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", METHODS)
def test_train_and_predict_end_to_end(name: str, base_config: dict[str, Any]) -> None:
    config = {
        **base_config,
        "method": CONFIGS[name].model_dump(),
        "train": {**base_config["train"], "epochs": 1, "precision": "fp32"},
    }
    result = tunesmith.train(**config)

    assert (result.run_dir / "final" / "trainable.safetensors").is_file()
    assert result.metrics["train"]["trainable_parameters"] == EXPECTED_COUNTS[name][0]
    held_out = result.metrics["validation"]["count"]
    assert result.metrics["train"]["steps"] == math.ceil((96 - held_out) / 8)  # one epoch, batches of 8
    predictions = tunesmith.predict(result.run_dir, ["good movie"])
    assert len(predictions) == 1
    scores = predictions[0]["scores"]
    assert set(scores) == {"negative", "positive"}
    assert math.isclose(sum(scores.values()), 1.0, abs_tol=1e-5)
    assert predictions[0]["label"] == max(scores, key=scores.__getitem__)


def test_prompt_tuning_that_overflows_the_positions_is_a_config_error(base_config: dict) -> None:
    cfg = {**base_config, "method": {"name": "prompt-tuning", "num_virtual_tokens": 20}}
    cfg["data"] = {**cfg["data"], "max_length": 60}  # 20 + 60 > the tiny BERT's 64 positions
    with pytest.raises(ConfigError, match="80 positions, but the model has 64"):
        tunesmith.train(cfg)


def test_ia3_vectors_get_no_weight_decay(tiny_bert: Path) -> None:
    model, method = _build(tiny_bert, IA3Config(), seed=0)
    groups = method.param_groups(model, 1e-3, 1e-3, 0.1)
    ia3 = {id(p) for n, p in model.named_parameters() if "ia3_l" in n}
    assert ia3
    for group in groups:
        if any(id(p) in ia3 for p in group["params"]):
            assert group["weight_decay"] == 0.0
