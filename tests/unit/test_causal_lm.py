"""The causal-LM side: packing isolation, KV-cache generation against a full recompute, and the
output-layer freezing that every method relies on."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_run_model, run_objective, run_tokenizer
from tunesmith.config import config_from_dict
from tunesmith.models.causal_lm import CausalLM
from tunesmith.models.generate import Sampling, generate_ids
from tunesmith.tasks.sft.objective import SftObjective, pack

GENERATING_METHODS = ["full", "lora", "adapter", "ia3", "prompt-tuning", "prefix-tuning", "partial"]


def _config(tiny_llama: Path, method: str, tmp_path: Path, attention: str = "auto", **data):
    return config_from_dict(
        {
            "model": {"name": str(tiny_llama), "attention": attention},
            "task": "sft",
            "method": method,
            "data": {"train": "unused.jsonl", "max_length": 64, **data},
            "train": {"precision": "fp32"},
            "output": str(tmp_path),
        }
    )


def _perturb(model: torch.nn.Module, names: list[str]) -> None:
    """Move every trainable weight off its init, so adapters actually change the output."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in names:
            params[name].add_(torch.randn_like(params[name]) * 0.05)


def _build(tiny_llama: Path, method: str, tmp_path: Path, attention: str = "auto") -> CausalLM:
    torch.manual_seed(0)
    model, _, names = build_run_model(_config(tiny_llama, method, tmp_path, attention), 0)
    _perturb(model, names)
    model.eval()
    assert isinstance(model, CausalLM)
    return model


def _greedy_by_recompute(model: CausalLM, prompt: list[int], steps: int) -> list[int]:
    """The slow, obviously right way: the whole sequence through `forward` for every new token."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.tensor([ids])
            hidden = model(input_ids=x, attention_mask=torch.ones_like(x)).hidden
            token = int(model.logits(hidden[:, -1]).argmax(-1))
            out.append(token)
            ids.append(token)
    return out


@pytest.mark.parametrize("method", GENERATING_METHODS)
def test_cached_batched_generation_equals_full_recompute(tiny_llama: Path, tmp_path: Path, method: str) -> None:
    model = _build(tiny_llama, method, tmp_path)
    prompts = [[5, 60, 70, 80, 90, 100, 110], [7, 8, 9], [200, 201, 202, 203, 204]]
    expected = [_greedy_by_recompute(model, p, 6) for p in prompts]
    got = generate_ids(model, prompts, eos_ids=[], sampling=Sampling(max_new_tokens=6), pad_id=2)
    assert got == expected


def test_generation_stops_at_eos_per_row(tiny_llama: Path, tmp_path: Path) -> None:
    model = _build(tiny_llama, "lora", tmp_path)
    prompts = [[5, 60, 70], [7, 8, 9, 10]]
    free = generate_ids(model, prompts, eos_ids=[], sampling=Sampling(max_new_tokens=5))
    stop = free[0][1]  # make row 0's second token an EOS
    got = generate_ids(model, prompts, eos_ids=[stop], sampling=Sampling(max_new_tokens=5))
    for row in range(2):
        cut = next((i for i, t in enumerate(free[row]) if t == stop), None)
        assert got[row] == (free[row] if cut is None else free[row][: cut + 1])
    assert len(got[0]) <= 2


def test_sampling_is_seeded(tiny_llama: Path, tmp_path: Path) -> None:
    model = _build(tiny_llama, "lora", tmp_path)
    sampling = Sampling(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=3)
    first = generate_ids(model, [[5, 6, 7]], [], sampling)
    assert first == generate_ids(model, [[5, 6, 7]], [], sampling)
    other = generate_ids(model, [[5, 6, 7]], [], Sampling(max_new_tokens=8, temperature=1.5, top_p=0.9, seed=4))
    assert first != other


def _row(ids: list[int], first_trained: int) -> dict:
    return {"input_ids": ids, "targets": [0] * first_trained + [1] * (len(ids) - first_trained)}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_rows_give_the_same_per_row_loss_as_alone(tiny_llama: Path, tmp_path: Path, attention: str) -> None:
    model = _build(tiny_llama, "lora", tmp_path, attention)
    objective = SftObjective(run_tokenizer(_config(tiny_llama, "lora", tmp_path)), max_length=32, packing=True)
    rows = [_row([5, 6, 7, 8, 9, 10, 11], 3), _row([20, 21, 22, 23, 2], 2), _row([30, 31, 32, 33, 34, 35, 2], 4)]

    def loss_of(items: list[dict]) -> torch.Tensor:
        batch = objective.collate(items)
        with torch.no_grad():
            return objective.loss(model(**objective.model_inputs(batch)), batch)

    packed = pack(rows, max_length=32)
    assert len(packed) == 1 and sorted(packed[0]["segments"]) == [5, 7, 7]
    alone = [float(loss_of([r])) for r in rows]
    counts = [sum(r["targets"][1:]) for r in rows]
    mean_alone = sum(loss * n for loss, n in zip(alone, counts, strict=True)) / sum(counts)
    assert float(loss_of(packed)) == pytest.approx(mean_alone, abs=1e-5)
    # and padded (unpacked) batches agree too
    assert float(loss_of(rows)) == pytest.approx(mean_alone, abs=1e-5)


def test_pack_fills_bins_first_fit_and_keeps_every_token() -> None:
    rows = [_row(list(range(n)), 1) for n in (9, 2, 6, 3, 4)]
    packed = pack(rows, max_length=10)
    assert all(sum(p["segments"]) <= 10 for p in packed)
    assert sorted(n for p in packed for n in p["segments"]) == [2, 3, 4, 6, 9]
    assert sum(len(p["input_ids"]) for p in packed) == 24


def test_labels_shift_and_mask_padding_by_attention_not_id(tiny_llama: Path, tmp_path: Path) -> None:
    tok = run_tokenizer(_config(tiny_llama, "lora", tmp_path))
    objective = SftObjective(tok, max_length=16)
    eos = tok.eos_token_id
    assert tok.pad_token_id == eos  # the conftest tokenizer pads with its EOS, as SmolLM2 does
    batch = objective.collate([_row([5, 6, 7, eos], 2), _row([8, 9], 1)])
    assert batch["labels"][0].tolist()[:4] == [-100, 7, eos, -100]  # EOS is a target even though pad == EOS
    assert batch["labels"][1].tolist()[:2] == [9, -100]
    assert batch["attention_mask"][1].tolist()[:3] == [1, 1, 0]
    assert (batch["labels"][:, 4:] == -100).all()


def test_output_layer_frozen_except_for_full(tiny_llama: Path, tmp_path: Path) -> None:
    for method, trains_output in (("lora", False), ("partial", False), ("full", True)):
        model, _, names = build_run_model(_config(tiny_llama, method, tmp_path), 0)
        assert isinstance(model, CausalLM)
        assert model.lm_head.weight.requires_grad is trains_output, method
        assert any(n.startswith("backbone.") for n in names)


def test_sft_refuses_methods_that_do_not_fit(tiny_llama: Path, tmp_path: Path) -> None:
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError, match="trains only a new head"):
        build_run_model(_config(tiny_llama, "feature-extraction", tmp_path), 0)
    with pytest.raises(ConfigError, match="packing"):
        build_run_model(_config(tiny_llama, "prompt-tuning", tmp_path, packing=True), 0)


def test_objective_for_sft_task(tiny_llama: Path, tmp_path: Path) -> None:
    cfg = _config(tiny_llama, "lora", tmp_path, template="plain", train_on_prompt=True)
    objective = run_objective(cfg)
    assert isinstance(objective, SftObjective)
    assert objective.resolved_template() == "plain" and objective.train_on_prompt


def test_frozen_matmuls_go_to_bf16_once_and_nothing_else_does(tiny_llama: Path, tmp_path: Path) -> None:
    from tunesmith.runtime import Runtime
    from tunesmith.training.loop import frozen_matmuls_to_bf16

    model, _, names = build_run_model(_config(tiny_llama, "lora", tmp_path), 0)
    assert isinstance(model, CausalLM)
    x = torch.tensor([[5, 6, 7, 8]])
    autocast = Runtime(torch.device("cpu"), "bf16", 8).autocast
    with torch.no_grad(), autocast():
        before = model(input_ids=x, attention_mask=torch.ones_like(x)).hidden
    cast = frozen_matmuls_to_bf16(model, set(names))
    assert cast == 2 * 7  # q, k, v, o, gate, up, down in 2 blocks
    params = dict(model.named_parameters())
    assert all(params[n].dtype == torch.float32 for n in names)  # LoRA weights keep fp32 masters
    assert model.lm_head.weight.dtype == torch.float32  # tied to the embedding
    assert all(p.dtype == torch.float32 for n, p in params.items() if "norm" in n)
    with torch.no_grad(), autocast():
        after = model(input_ids=x, attention_mask=torch.ones_like(x)).hidden
    assert torch.equal(before, after)  # exactly the values autocast used before


def test_once_frozen_matmuls_are_bf16_the_checkpoint_file_is_no_longer_held(tiny_llama: Path, tmp_path: Path) -> None:
    """The embeddings and norms still read the memory-mapped checkpoint after the cast: copied, the
    file's mapping (every page of it resident) goes."""
    from tunesmith.training.loop import frozen_matmuls_to_bf16

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs /proc/self/maps (Linux) to see which files the process maps")
    own = shutil.copytree(tiny_llama, tmp_path / "llama")  # a file no other test's model maps
    weights = own / "model.safetensors"
    model, _, names = build_run_model(_config(own, "lora", tmp_path), 0)
    borrowed = [n for n, p in model.named_parameters() if not p.untyped_storage().resizable()]
    assert borrowed  # as loaded: views of the mapped file
    embedding = model.lm_head.weight.detach().clone()
    frozen_matmuls_to_bf16(model, set(names))
    gc.collect()
    assert all(p.untyped_storage().resizable() for p in model.parameters())
    embeddings = [m for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert model.lm_head.weight is embeddings[0].weight  # still tied
    assert torch.equal(model.lm_head.weight, embedding)
    assert str(weights.resolve()) not in maps.read_text()
