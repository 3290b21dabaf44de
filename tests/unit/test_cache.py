"""Frozen work done once for `partial`: the token states entering the first trainable block are
cached, and training on them gives what training on token ids gives."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tunesmith
from conftest import VOCAB, sentiment_rows
from tunesmith.config import ModelConfig
from tunesmith.data.records import Example
from tunesmith.methods.freeze import PartialConfig
from tunesmith.models.classifier import TextClassifier
from tunesmith.models.load import build_classifier, load_tokenizer
from tunesmith.plugins import build_method
from tunesmith.tasks.classification import ClassificationObjective
from tunesmith.training import cache as cache_module
from tunesmith.training.cache import cache_hidden

H = 32  # the tiny BERT's hidden size


def _fp32() -> contextlib.nullcontext[None]:
    return contextlib.nullcontext()


def _objective(tiny_bert: Path) -> ClassificationObjective:
    return ClassificationObjective(load_tokenizer(ModelConfig(name=str(tiny_bert))), ["negative", "positive"], 16)


def _items(objective: ClassificationObjective, n: int = 24) -> list[dict[str, Any]]:
    return objective.encode([Example(text=r["text"], label=r["label"]) for r in sentiment_rows(n, seed=3)])


def _partial(tiny_bert: Path, freeze_layers: int = 1) -> tuple[TextClassifier, Any]:
    model = build_classifier(ModelConfig(name=str(tiny_bert)), 2, seed=0)
    method = build_method(PartialConfig(freeze_layers=freeze_layers))
    method.apply(model)
    return model, method


def _cache(model: Any, objective: Any, items: list, tmp_path: Path, max_bytes: int = 2**30, k: int = 1) -> list:
    cached = cache_hidden(model, items, objective.collate, 5, _fp32, max_bytes, tmp_path / "cache", "train", k)
    assert cached is not None
    return cached


@torch.no_grad()
def _logits(model: TextClassifier, objective: ClassificationObjective, items: list) -> torch.Tensor:
    """Eval-mode logits (N, 2), one item at a time (no padding either way)."""
    model.eval()
    return torch.cat([model(**objective.model_inputs(objective.collate([it]))) for it in items])


def test_partial_method_reports_its_frozen_blocks(tiny_bert: Path) -> None:
    assert _partial(tiny_bert, freeze_layers=1)[1].frozen_blocks == 1
    assert _partial(tiny_bert, freeze_layers=0)[1].frozen_blocks == 0
    model = build_classifier(ModelConfig(name=str(tiny_bert)), 2, seed=0)
    regex = build_method(PartialConfig(trainable_regex=r"layer\.1\."))
    regex.apply(model)
    assert regex.frozen_blocks == 0  # what a regex leaves frozen need not be a prefix: nothing cached


def test_logits_from_cached_states_equal_the_full_forward(tiny_bert: Path, tmp_path: Path) -> None:
    model, method = _partial(tiny_bert)
    objective = _objective(tiny_bert)
    items = _items(objective)
    cached = _cache(model, objective, items, tmp_path, k=method.frozen_blocks)

    assert all(it["start_block"] == 1 and set(it) == {"hidden", "label", "start_block"} for it in cached)
    assert [it["label"] for it in cached] == [it["label"] for it in items]
    want = _logits(model, objective, items)
    torch.testing.assert_close(_logits(model, objective, cached), want, rtol=0, atol=1e-5)
    # Padded batches too: zero states past each example's end are masked out.
    with torch.no_grad():
        padded = model(**objective.model_inputs(objective.collate(cached)))
    torch.testing.assert_close(padded, want, rtol=0, atol=1e-5)


def test_frozen_prefix_runs_without_dropout_in_training(tiny_bert: Path) -> None:
    model, _ = _partial(tiny_bert)
    objective = _objective(tiny_bert)
    batch = objective.collate(_items(objective, 8))
    args = (batch["input_ids"], batch["attention_mask"], None)
    model.eval()
    with torch.no_grad():
        want = model.encode_prefix(*args, k=1)
        model.train()
        assert torch.equal(model.encode_prefix(*args, k=1), want)  # embeddings + block 0: no dropout
        assert not torch.equal(model.encode_prefix(*args, k=2), model.encode_prefix(*args, k=2))  # block 1 still drops
    block_1 = [m.p for n, m in model.backbone.named_modules() if isinstance(m, nn.Dropout) and "layer.1." in n]
    assert block_1 and all(p == pytest.approx(0.1) for p in block_1)


def test_items_keep_their_own_length(tiny_bert: Path, tmp_path: Path) -> None:
    model, _ = _partial(tiny_bert)
    objective = _objective(tiny_bert)
    items = _items(objective)
    lengths = [len(it["input_ids"]) for it in items]
    assert len(set(lengths)) > 2
    cached = _cache(model, objective, items, tmp_path)

    assert [tuple(it["hidden"].shape) for it in cached] == [(n, H) for n in lengths]
    assert [objective.length(it) for it in cached] == lengths  # length-grouped batching still sees T_i
    # One store of sum(T_i) rows, example after example: no padding kept.
    ends = [it["hidden"].data_ptr() + it["hidden"].nbytes for it in cached[:-1]]
    assert ends == [it["hidden"].data_ptr() for it in cached[1:]]
    batch = objective.collate(cached[:6])
    # Padded as token ids are (same shapes, so the blocks above draw the same dropout masks).
    assert batch["hidden"].shape == (6, objective.collate(items[:6])["input_ids"].shape[1], H)
    assert torch.equal(batch["attention_mask"], objective.collate(items[:6])["attention_mask"])
    assert batch["attention_mask"].sum(1).tolist() == lengths[:6]
    assert int(batch["start_block"]) == 1


def test_spilled_cache_gives_identical_states(tiny_bert: Path, tmp_path: Path) -> None:
    model, _ = _partial(tiny_bert)
    objective = _objective(tiny_bert)
    items = _items(objective)
    in_memory = _cache(model, objective, items, tmp_path / "a")
    spilled = _cache(model, objective, items, tmp_path / "b", max_bytes=1)

    spill_file = tmp_path / "b" / "cache" / "train.f32"
    assert spill_file.stat().st_size == sum(len(it["input_ids"]) for it in items) * H * 4
    assert not (tmp_path / "a" / "cache").exists()
    for a, b in zip(in_memory, spilled, strict=True):
        assert torch.equal(a["hidden"], b["hidden"])
    assert torch.equal(_logits(model, objective, spilled), _logits(model, objective, in_memory))


def test_cached_partial_run_ends_with_the_same_weights_as_an_uncached_one(
    base_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = {k: v for k, v in base_config.items() if k != "output"}
    cfg["method"] = {"name": "partial", "freeze_layers": 1}
    cfg["train"] = {**cfg["train"], "epochs": 3, "lr": 1e-3}  # dropout stays on in block 1 and the head

    calls: list[bool] = []

    def spy(*args: Any, **kwargs: Any) -> list | None:
        cached = cache_hidden(*args, **kwargs)
        calls.append(cached is not None)
        return cached

    monkeypatch.setattr(cache_module, "cache_hidden", spy)
    cached = tunesmith.train(output=str(tmp_path / "cached"), **cfg)
    assert calls == [True, True]  # train and validation items were cached
    monkeypatch.setattr(cache_module, "cache_hidden", lambda *args, **kwargs: None)  # as for a model it cannot split
    uncached = tunesmith.train(output=str(tmp_path / "uncached"), **cfg)

    want = load_file(str(uncached.run_dir / "final" / "trainable.safetensors"))
    got = load_file(str(cached.run_dir / "final" / "trainable.safetensors"))
    assert want.keys() == got.keys() and any(".layer.1." in name for name in got)
    # On a GPU the prefix-only and whole-model forwards use different kernels (shapes differ), so
    # float rounding differs slightly; on the CPU the two runs agree to 1e-6.
    atol = 1e-3 if torch.cuda.is_available() else 1e-6
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)
    if not torch.cuda.is_available():
        assert cached.metrics["validation"]["accuracy"] == uncached.metrics["validation"]["accuracy"]


class _ToyEncoder(nn.Module):
    """Embeddings, two linear blocks, and optionally a step after the blocks (like a final norm)."""

    def __init__(self, embeddings_name: str, final_step: bool) -> None:
        super().__init__()
        self.embeddings_name = embeddings_name
        setattr(self, embeddings_name, nn.Embedding(len(VOCAB), H))
        self.layers = nn.ModuleList([nn.Linear(H, H), nn.Linear(H, H)])
        self.final_step = final_step

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None):
        embed = getattr(self, self.embeddings_name)
        x = embed(input_ids) if inputs_embeds is None else embed(inputs_embeds=inputs_embeds)  # (B, T, H)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return SimpleNamespace(last_hidden_state=2 * x if self.final_step else x)


@pytest.mark.parametrize(
    ("embeddings_name", "final_step", "why"),
    [("embed", False, "cannot start at block 1"), ("embeddings", True, "split at block 1 differs")],
)
def test_a_model_it_cannot_split_is_not_cached(
    embeddings_name: str, final_step: bool, why: str, tiny_bert: Path, tmp_path: Path
) -> None:
    model = TextClassifier(_ToyEncoder(embeddings_name, final_step), H, 2)
    objective = _objective(tiny_bert)
    with pytest.warns(UserWarning, match=why):
        cached = cache_hidden(model, _items(objective), objective.collate, 5, _fp32, 2**30, tmp_path, "train", 1)
    assert cached is None
    assert model.training  # left in the mode it was in
