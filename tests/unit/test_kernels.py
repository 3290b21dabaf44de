"""Kernel choices measured on the machine: the attention and dropout probes, their per-machine cache,
what a run records in plan.json, and the LoRA dropout folded into the adapter's first matrix."""

from __future__ import annotations

import json
import math
import types
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import tunesmith
from conftest import write_jsonl
from tunesmith import runtime
from tunesmith.machine import remembered
from tunesmith.methods.lora import recompute_lora_dropout
from tunesmith.runtime import Runtime
from tunesmith.training import fused_lora, kernels
from tunesmith.training.attention import ATTENTION
from tunesmith.training.dropout import (
    DropMask,
    DroppedLinear,
    _drop_mask,
    _DroppedLinear,
    _pack_bits,
    _unpack_bits,
    dropped_linear,
    fast_dropout,
)

CPU = Runtime(torch.device("cpu"), "fp32", 8)


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_faster_kernel_wins_unless_another_is_leaner_and_nearly_as_fast() -> None:
    assert kernels.pick({"a": {"ms": 10, "saved_mb": 5}, "b": {"ms": 20, "saved_mb": 1}}) == "a"
    assert kernels.pick({"a": {"ms": 10, "saved_mb": 5}, "b": {"ms": 10.9, "saved_mb": 1}}) == "b"
    assert kernels.pick({"a": {"ms": 10, "saved_mb": 1}, "b": {"ms": 9.5, "saved_mb": 5}}) == "a"


def test_a_measurement_is_kept_per_machine_and_reused(_own_cache: Path) -> None:
    calls = []

    def measure() -> dict:
        calls.append(1)
        return {"choice": "x"}

    assert remembered("k", measure, "probe.json") == {"choice": "x", "cached": False}
    assert remembered("k", measure, "probe.json") == {"choice": "x", "cached": True}
    assert len(calls) == 1
    assert json.loads((_own_cache / "probe.json").read_text()) == {"k": {"choice": "x"}}


def test_the_probes_time_and_weigh_both_kernels_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    result = kernels._probe_attention((2, 4, 2, 64, 8), CPU)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(result["measured"]) == {"eager", "sdpa"} and result["choice"] in ("eager", "sdpa")
    eager, sdpa = result["measured"]["eager"], result["measured"]["sdpa"]
    # eager keeps the (B, H, T, T) attention weights for backward; the fused kernel does not
    assert eager["saved_mb"] > sdpa["saved_mb"] > 0 and eager["ms"] > 0 and sdpa["ms"] > 0
    dropout = kernels._probe_dropout(1 << 16, CPU)
    assert set(dropout["measured"]) == {"torch", "fast"} and dropout["choice"] in ("torch", "fast")
    kernels._probe_loss_chunk([256, 512], 1000, 16, True, CPU)
    runtime._matmul_gflops(torch.float32, 64)  # `precision: auto`'s probe
    # a machine's first run, which measures, draws the same numbers as its later ones, which recall
    assert torch.equal(torch.get_rng_state(), before)


def test_probed_kernels_take_turns_so_that_a_slow_spell_of_the_machine_falls_on_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Two kernels of the same cost on a machine that runs its first calls at a quarter of its
    # speed (a fresh process's first touches of memory, another process finishing): timed one
    # after the other, the first kernel took all the slow calls and lost by 4x.
    calls: list[str] = []
    clock = [0.0]

    def kernel(name: str) -> Any:
        def run() -> torch.Tensor:
            calls.append(name)
            clock[0] += 0.004 if len(calls) <= 4 else 0.001
            return torch.ones(1, requires_grad=True) * 2

        return run

    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    result = kernels._probe({"a": kernel("a"), "b": kernel("b")}, CPU)
    assert calls[:6] == ["a", "b", "b", "a", "a", "b"]
    assert calls.count("a") == calls.count("b") == kernels.PROBE_ROUNDS + 1
    assert result["measured"]["a"]["ms"] == result["measured"]["b"]["ms"] == 1.0


def test_attention_is_timed_where_most_tokens_are_and_weighed_where_the_longest_rows_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # eager wins at the short rows that hold most tokens, sdpa at the few longest; eager keeps 5x
    # the bytes at the longest, as on a 2-core EPYC at 8 x 128 against 8 x 512 tokens.
    probed: list[int] = []

    def probe(shape: tuple[int, int, int, int, int], runtime: Runtime) -> dict:
        probed.append(shape[3])
        eager_ms, sdpa_ms = (12.0, 24.0) if shape[3] == 128 else (230.0, 105.0)
        saved = shape[3] / 4
        return {
            "measured": {"eager": {"ms": eager_ms, "saved_mb": saved}, "sdpa": {"ms": sdpa_ms, "saved_mb": saved / 5}},
            "probe_seconds": 1.0,
        }

    monkeypatch.setattr(kernels, "_probe_attention", probe)
    assert kernels._half_the_tokens([100] * 30 + [500] * 2) == 100
    result = kernels._probe_attention_where_it_counts((8, 9, 3, 512, 64), 128, CPU)
    assert probed == [512, 128] and result["timed_at_tokens"] == 128 and result["choice"] == "eager"
    assert result["measured"] == {"eager": {"ms": 12.0, "saved_mb": 128.0}, "sdpa": {"ms": 24.0, "saved_mb": 25.6}}
    # rows all about as long as the longest: one probe there, and its choice
    probed.clear()
    assert kernels._half_the_tokens([500] * 30 + [100] * 2) == 500
    assert kernels._probe_attention_where_it_counts((8, 9, 3, 512, 64), 512, CPU)["measured"]["sdpa"]["ms"] == 105.0
    assert probed == [512]


def test_saved_bytes_counts_what_backward_keeps() -> None:
    x = torch.randn(100, 10, requires_grad=True)
    _, saved = kernels.saved_bytes(lambda: x.exp())  # exp keeps its output: 100 x 10 floats
    assert saved == 100 * 10 * 4


def _qa(n: int) -> list[dict]:
    return [{"prompt": f"colour of {w} {i}?", "completion": w} for i, w in enumerate(["red", "blue"] * (n // 2))]


def test_a_run_measures_applies_and_records_its_kernels_and_a_resume_reuses_them(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chosen: list[str] = []
    real = kernels._set_attention
    monkeypatch.setattr(kernels, "_set_attention", lambda model, k: (chosen.append(k), real(model, k)))
    config = {
        "model": str(tiny_llama),
        "task": "sft",
        "method": {"name": "lora", "dropout": 0.1},
        "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", _qa(16))), "validation": None, "max_length": 40},
        "train": {"epochs": 1, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "save_every": 2},
        "eval": {"samples": 0},
        "output": str(tmp_path / "runs"),
    }
    result = tunesmith.train(config)
    plan = json.loads((result.run_dir / "plan.json").read_text())
    attention = plan["kernels"]["attention"]
    assert attention["choice"] in ("eager", "sdpa") and attention["cached"] is False
    assert set(attention["measured"]) == {"eager", "sdpa"} and attention["probe_seconds"] > 0
    assert chosen == [attention["choice"]]
    # the LoRA dropouts are folded into the adapters (no nn.Dropout is left to probe)
    assert "dropout" not in plan["kernels"]

    # A second run of the same shape class reads the cache; a resumed run applies its record unmeasured.
    again = tunesmith.train({**config, "output": str(tmp_path / "again")})
    assert json.loads((again.run_dir / "plan.json").read_text())["kernels"]["attention"]["cached"] is True

    def refuse(*args: object) -> dict:
        raise AssertionError("a resumed run measured again")

    monkeypatch.setattr(kernels, "measure_kernels", refuse)
    resumed = tunesmith.train(config, resume=result.run_dir)
    assert json.loads((resumed.run_dir / "plan.json").read_text())["kernels"] == plan["kernels"]


def test_dpo_computes_its_reference_with_the_kernel_the_policy_trains_with(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The model loads with torch's fused kernel; where the probe picks eager, a reference computed
    # before the switch differed from the bf16 policy (the first DPO loss 0.6885, not log 2).
    from tunesmith.models.causal_lm import base_decoder
    from tunesmith.tasks.dpo import DpoObjective

    monkeypatch.setattr(kernels, "measure_kernels", lambda *args: {"attention": {"choice": "eager"}})
    seen: list[str] = []
    sizes: list[int] = []
    real = DpoObjective.add_reference

    def spy(self: DpoObjective, model: nn.Module, items: list, runtime: Runtime) -> list:
        seen.append(base_decoder(getattr(model, "backbone", model)).config._attn_implementation)
        sizes.append(runtime.eval_batch_size)
        return real(self, model, items, runtime)

    monkeypatch.setattr(DpoObjective, "add_reference", spy)
    rows = [{"prompt": f"review {i}", "chosen": "good film", "rejected": "bad film"} for i in range(16)]
    result = tunesmith.train(
        model=str(tiny_llama),
        task="dpo",
        method="lora",
        data={"train": str(write_jsonl(tmp_path / "pairs.jsonl", rows)), "validation": 0.25, "max_length": 32},
        train={"epochs": 1, "batch_size": 4, "log_every": 1, "precision": "bf16"},
        output=str(tmp_path / "runs"),
    )
    assert seen and set(seen) == {"eager"}
    assert set(sizes) == {4}  # no more pairs a batch than a training step: eager keeps its scores
    first = next(json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines())
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)


def test_a_fixed_kernel_is_not_probed(tiny_llama: Path, tmp_path: Path) -> None:
    config = {
        "model": {"name": str(tiny_llama), "attention": "eager"},
        "task": "sft",
        "method": {"name": "lora", "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", _qa(8))), "validation": None, "max_length": 40},
        "train": {"epochs": 1, "batch_size": 4, "precision": "fp32"},
        "eval": {"samples": 0},
        "output": str(tmp_path / "runs"),
    }
    plan = json.loads((tunesmith.train(config).run_dir / "plan.json").read_text())
    assert plan["kernels"] == {}


def test_a_classifier_probes_its_dropout_and_its_attention_dropout(tiny_bert: Path, tmp_path: Path) -> None:
    from conftest import sentiment_rows

    config = {
        "model": str(tiny_bert),
        "task": "classification",
        "method": "full",
        "data": {
            "train": str(write_jsonl(tmp_path / "s.jsonl", sentiment_rows(16))),
            "validation": None,
            "max_length": 32,
        },
        "train": {"epochs": 1, "batch_size": 8, "precision": "fp32"},
        "output": str(tmp_path / "runs"),
    }
    result = tunesmith.train(config)
    chosen = json.loads((result.run_dir / "plan.json").read_text())["kernels"]
    dropout, attention = chosen["dropout"], chosen["attention"]
    assert dropout["choice"] in ("torch", "fast") and set(dropout["measured"]) == {"torch", "fast"}
    # training/attention.py: torch's kernel against the one that keeps no (query x key) tensor
    assert set(attention["measured"]) == {"sdpa", ATTENTION} and attention["choice"] in ("sdpa", ATTENTION)
    assert all(m["saved_mb"] >= 0 for m in attention["measured"].values())


# -- LoRA's dropout folded into its first matrix ---------------------------------------------------


def _seeded_mask(shape: torch.Size) -> DropMask:
    torch.manual_seed(7)
    return DropMask(shape, 0.3, torch.device("cpu"))


def test_dropped_linear_has_the_gradients_of_dropout_then_linear() -> None:
    x = torch.randn(2, 3, 4, dtype=torch.double, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.double, requires_grad=True)
    # the mask is drawn again from its RNG state in the backward pass: gradcheck proves it the same
    assert torch.autograd.gradcheck(lambda a, b: _DroppedLinear.apply(a, b, _seeded_mask(x.shape)), (x, w))
    torch.manual_seed(7)
    drop, scale = _drop_mask(x.shape, 0.3, x.device)
    out = _DroppedLinear.apply(x, w, _seeded_mask(x.shape))
    assert torch.allclose(out, nn.functional.linear(x.masked_fill(drop, 0) * scale, w))


def test_fast_dropout_keeps_its_mask_at_one_bit_an_element_and_nothing_else() -> None:
    x = torch.randn(64, 32, dtype=torch.double, requires_grad=True)
    torch.manual_seed(3)
    out, saved = kernels.saved_bytes(lambda: fast_dropout(x, 0.25))
    assert saved == x.numel() // 8  # neither x nor a byte mask
    out.backward(torch.ones_like(out))
    assert x.grad is not None and torch.equal(x.grad != 0, out != 0)  # the same elements dropped
    assert torch.autograd.gradcheck(lambda a: (torch.manual_seed(3), fast_dropout(a, 0.25))[1], (x,))


def test_dropped_linear_keeps_the_input_once_for_every_adapter_that_reads_it() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    weights = [torch.randn(4, 32, requires_grad=True) for _ in range(3)]
    _, folded = kernels.saved_bytes(lambda: sum(dropped_linear(x, w, 0.1).sum() for w in weights))
    _, plain = kernels.saved_bytes(
        lambda: sum(nn.functional.linear(nn.functional.dropout(x, 0.1), w).sum() for w in weights)
    )
    # x once (4 bytes an element) and three masks of a bit an element, against three dropped copies and masks
    assert folded <= 4 * x.numel() + 3 * x.numel() // 8 + 3 * 4 * 32 * 4 < 12 * x.numel() < plain


@pytest.mark.parametrize("n", [1, 7, 8, 9, 4096 + 3])
def test_masks_pack_to_a_bit_an_element_and_back(n: int) -> None:
    import numpy as np

    mask = (torch.rand(n) < 0.4).to(torch.uint8)
    bits = _pack_bits(mask)
    assert bits.dtype == torch.uint8 and bits.numel() == (n + 7) // 8
    assert np.array_equal(bits.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(_unpack_bits(bits, torch.Size([n])), mask)


def test_the_drop_mask_drops_the_right_share_in_every_lane() -> None:
    torch.manual_seed(0)
    drop, scale = _drop_mask(torch.Size([400_000]), 0.1, torch.device("cpu"))
    for lane in range(4):
        assert float(drop[lane::4].float().mean()) == pytest.approx(0.1, abs=0.006), lane
    assert scale == pytest.approx(1 / 0.9, rel=1e-4)


def test_cpu_masks_follow_the_torch_rng_and_a_resumed_rng_state() -> None:
    from tunesmith.training.dropout import _lanes

    shape = torch.Size([3, 1000])
    torch.manual_seed(4)
    first = _lanes(shape, torch.device("cpu"))
    state = torch.get_rng_state()  # as a checkpoint saves it
    second = _lanes(shape, torch.device("cpu"))
    torch.manual_seed(4)
    assert torch.equal(_lanes(shape, torch.device("cpu")), first)
    torch.set_rng_state(state)  # as a resumed run restores it
    assert torch.equal(_lanes(shape, torch.device("cpu")), second)
    assert not torch.equal(first, second) and first.dtype == torch.int16 and first.shape == shape


def test_lora_dropout_is_folded_into_plain_adapters_only(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    def build(**options: object) -> nn.Module:
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "v_proj"], **options)
        return peft.get_peft_model(base, cfg)

    model = build()
    names = {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():  # B starts at zero: give the adapters something to add
        if "lora_B" in name:
            nn.init.normal_(param)
    ids = torch.randint(0, 100, (2, 7))
    model.eval()
    before = model(input_ids=ids).logits
    assert recompute_lora_dropout(model) == 4  # q and v in each of 2 layers
    assert {n for n, _ in model.named_parameters()} == names  # same parameters, same names
    assert sum(isinstance(m, DroppedLinear) for m in model.modules()) == 4
    assert not any(type(m) is nn.Dropout and m.p > 0 for m in model.modules())
    assert torch.allclose(model(input_ids=ids).logits, before)  # evaluation is unchanged
    model.train()
    torch.manual_seed(1)
    a = model(input_ids=ids).logits
    torch.manual_seed(1)
    b = model(input_ids=ids).logits
    assert torch.equal(a, b) and not torch.allclose(a, before)  # seeded like nn.Dropout; it drops

    assert recompute_lora_dropout(build(use_dora=True)) == 0  # DoRA keeps peft's path


# -- decoding ------------------------------------------------------------------------------------


def _lm(path: Path):
    from tunesmith.config import ModelConfig
    from tunesmith.models.load import build_causal_lm

    return build_causal_lm(ModelConfig(name=str(path)), 64).eval()


def test_reordered_weights_decode_what_plain_ones_do(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunesmith.models import packed
    from tunesmith.models.generate import Sampling, generate_ids

    if not packed._available():
        pytest.skip("this torch has no oneDNN")
    lm = _lm(tiny_llama)
    prompts = [[5, 6, 7, 8], [9, 10], [5, 6, 7, 8]]
    monkeypatch.setattr(packed, "packing_wins", lambda model, rows: {"choice": "plain"})
    plain = generate_ids(lm, prompts, [], Sampling(max_new_tokens=6))
    monkeypatch.setattr(packed, "MIN_WIDTH", 8)  # the tiny model's linears are 32 wide
    monkeypatch.setattr(packed, "packing_wins", lambda model, rows: {"choice": "packed", "break_even_steps": 1})
    with torch.no_grad(), packed.packed_linears(lm, 3, steps=6) as used:
        assert used and isinstance(lm.lm_head.forward, packed._PackedForward)
        x = torch.randn(3, 32)
        assert torch.allclose(lm.lm_head(x), torch.nn.functional.linear(x, lm.lm_head.weight), atol=1e-5)
    assert "forward" not in vars(lm.lm_head)  # put back
    assert generate_ids(lm, prompts, [], Sampling(max_new_tokens=6)) == plain
    # a short generation does not pay for the reordering
    monkeypatch.setattr(packed, "packing_wins", lambda model, rows: {"choice": "packed", "break_even_steps": 10})
    with packed.packed_linears(lm, 3, steps=6) as used:
        assert not used


def test_a_shared_prompt_is_run_once_and_every_copy_continues_it(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunesmith.models import generate

    lm = _lm(tiny_llama)
    prefilled: list[int] = []
    real = generate._prefill
    monkeypatch.setattr(
        generate, "_prefill", lambda b, d, ids, mask: (prefilled.append(len(ids)), real(b, d, ids, mask))[1]
    )
    greedy = generate.Sampling(max_new_tokens=5)
    together = generate.generate_ids(lm, [[5, 6, 7], [9], [5, 6, 7], [9]], [], greedy)
    assert prefilled == [2]
    alone = [generate.generate_ids(lm, [p], [], greedy)[0] for p in ([5, 6, 7], [9])]
    assert together == alone + alone


def test_sampling_draws_from_the_distribution_and_never_a_token_of_probability_zero() -> None:
    from tunesmith.models.generate import Sampling, _choose

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    logits = probs.log().expand(20_000, -1)  # log 0 = -inf: probability exactly zero
    drawn = _choose(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(0))
    counts = torch.bincount(drawn, minlength=6).float() / len(drawn)
    assert counts[[0, 2, 5]].sum() == 0
    assert torch.allclose(counts, probs, atol=0.015)


# -- memory handed back between blocks -------------------------------------------------------------


def test_trimming_runs_after_every_nth_block_in_training_passes_only(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from tunesmith.training import memory

    calls: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # 2 decoder blocks
    handles = memory.trim_between_blocks(model, 1)
    ids = torch.randint(0, 100, (2, 5))
    model(input_ids=ids).logits.sum().backward()
    assert calls == [0, 0]
    with torch.no_grad():
        model(input_ids=ids)
    assert calls == [0, 0]  # evaluation: nothing kept, nothing to trim
    for handle in handles:
        handle.remove()
    assert len(memory.trim_between_blocks(model, 2)) == 1 and memory.trim_between_blocks(model, 0) == []
    assert memory._malloc_trim is not None


def test_auto_trims_after_a_block_once_resident_memory_grew_enough(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import AutoModelForCausalLM

    from tunesmith.training import memory

    calls: list[int] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: calls.append(pad) or 1)
    grown = memory.AUTO_GROWTH + 1
    # resident bytes read: pass start, after block 1, after block 2, after the trim; then a second pass
    readings = iter([5, 10, 5 + grown, 7, 100, 110, 120])

    class Process:
        def memory_info(self) -> Any:
            return types.SimpleNamespace(rss=next(readings))

    monkeypatch.setattr(memory.psutil, "Process", Process)
    monkeypatch.setattr(memory, "_short_of_memory", lambda: True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)  # 2 decoder blocks
    handles = memory.trim_between_blocks(model, "auto")
    ids = torch.randint(0, 100, (2, 5))
    model(input_ids=ids).logits.sum().backward()
    assert calls == [0]  # after block 2 only: block 1 had grown by 5 bytes
    model(input_ids=ids).logits.sum().backward()
    assert calls == [0]  # 20 bytes of growth: nothing to trim
    with torch.no_grad():
        model(input_ids=ids)  # evaluation reads nothing (the readings would run out)
    for handle in handles:
        handle.remove()
    assert memory.trim_between_blocks(model, "auto", torch.device("meta")) == []  # not the host's heap
    monkeypatch.setattr(memory, "_short_of_memory", lambda: False)
    roomy = memory.AUTO_GROWTH_ROOMY
    readings = iter([0, grown, roomy + 1, 3])
    handles = memory.trim_between_blocks(model, "auto")
    model(input_ids=ids).logits.sum().backward()
    assert calls == [0, 0]  # plenty of memory available: only the larger growth (block 2) trims


def test_evaluation_and_the_end_of_training_hand_the_free_pages_back(
    base_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tunesmith.training.loop as loop
    from tunesmith.training import memory

    events: list[str] = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: lambda pad: events.append("trim") or 1)
    evaluate = loop.evaluate_items
    monkeypatch.setattr(loop, "evaluate_items", lambda *a, **k: (events.append("evaluate"), evaluate(*a, **k))[1])
    tunesmith.train({**base_config, "train": {**base_config["train"], "max_steps": 2, "eval_every": 1}})
    assert events == ["trim", "evaluate", "trim"] * 2 + ["trim"]  # and once the steps are done


@pytest.mark.parametrize("value", ["sometimes", -2, 1.5, True])
def test_a_bad_trim_setting_is_refused_in_one_line(value: object) -> None:
    from tunesmith.config import config_from_dict
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": "m", "data": {"train": "x"}, "train": {"trim_memory_every": value}})
    problem = str(info.value).splitlines()[1:]
    assert problem == [
        f"  train.trim_memory_every: {value!r}: give auto, 0 (never) or a whole number of blocks, e.g. 3"
    ]


def test_a_run_with_trimming_trains_as_one_without(tiny_llama: Path, tmp_path: Path) -> None:
    base = {
        "model": str(tiny_llama),
        "task": "sft",
        "method": {"name": "lora", "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", _qa(16))), "validation": None, "max_length": 40},
        "train": {"epochs": 1, "batch_size": 4, "precision": "fp32"},
        "eval": {"samples": 0},
    }
    plain = tunesmith.train({**base, "train": {**base["train"], "trim_memory_every": 0}, "output": str(tmp_path / "a")})
    trimmed = tunesmith.train(
        {**base, "train": {**base["train"], "trim_memory_every": 1}, "output": str(tmp_path / "b")}
    )
    a = load_file(plain.run_dir / "final" / "trainable.safetensors")
    b = load_file(trimmed.run_dir / "final" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- the gated MLP's activation recomputed ---------------------------------------------------------


def test_silu_gate_has_the_gradients_of_silu_times_up_and_keeps_two_tensors() -> None:
    from tunesmith.models.gated_mlp import silu_gate

    g = torch.randn(3, 7, dtype=torch.double, requires_grad=True)
    u = torch.randn(3, 7, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(silu_gate, (g, u))
    gate, up, upstream = (torch.randn(5, 40).bfloat16() for _ in range(3))  # as under autocast
    ours = torch.autograd.grad(silu_gate(*(t.requires_grad_() for t in (gate, up))), (gate, up), upstream)
    theirs = torch.autograd.grad(nn.functional.silu(gate) * up, (gate, up), upstream)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))  # autograd's gradients to the bit
    x = torch.randn(64, 32, requires_grad=True)
    w1, w2 = torch.randn(48, 32), torch.randn(48, 32)
    _, fused = kernels.saved_bytes(lambda: silu_gate(x @ w1.T, x @ w2.T))
    _, plain = kernels.saved_bytes(lambda: nn.functional.silu(x @ w1.T) * (x @ w2.T))
    assert plain - fused == 64 * 48 * 4  # autograd also keeps silu's output; the fused function does not


def test_a_causal_lm_recomputes_its_gated_activations_and_computes_as_before(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    lm = _lm(tiny_llama)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    decoder = reference.get_decoder()
    assert all("forward" in vars(layer.mlp) for layer in lm.backbone.layers)
    ids = torch.randint(0, 100, (2, 9))
    lm.train(), decoder.train()
    ours = lm(ids, torch.ones_like(ids)).hidden
    theirs = decoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    assert torch.allclose(ours, theirs, atol=1e-6)
    ours.pow(2).sum().backward()
    theirs.pow(2).sum().backward()
    for (name, a), b in zip(lm.backbone.named_parameters(), decoder.parameters(), strict=True):
        if a.requires_grad:  # (the tied embedding starts frozen in a causal LM)
            assert torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_lora_adapters_compute_norm_outputs_and_gated_products_again_to_the_bit(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunesmith.training import dropout

    lm = _lm(tiny_llama)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear")
    lm.backbone = peft.get_peft_model(lm.backbone, cfg)
    recompute_lora_dropout(lm.backbone)
    for name, param in lm.named_parameters():  # B starts at zero: give the adapters something to add
        if "lora_B" in name:
            nn.init.normal_(param)
    lm.train()
    ids = torch.randint(0, 100, (2, 9))

    def step() -> tuple[int, dict[str, torch.Tensor]]:
        lm.zero_grad()
        torch.manual_seed(5)
        out, saved = kernels.saved_bytes(lambda: lm(ids, torch.ones_like(ids)).hidden.pow(2).sum())
        out.backward()
        return saved, {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}

    recomputed, grads = step()
    monkeypatch.setattr(dropout, "recipe", lambda t: None)  # keep every adapter input instead
    kept, kept_grads = step()
    assert grads.keys() == kept_grads.keys() and len(grads) == 2 * 7 * 2  # A and B of 7 linears, 2 layers
    for name, grad in grads.items():
        assert torch.equal(grad, kept_grads[name]), name
    hidden, inter, tokens = 32, 64, ids.numel()  # tiny_llama's sizes (conftest)
    # per layer: the input norm's output (q, k, v), the post-attention norm's (gate, up), the product
    # (down); but the first block's norm reads the frozen embedding's output, which nothing else keeps:
    # that input is kept in the output's place
    assert kept - recomputed == (2 * tokens * (2 * hidden + inter) - tokens * hidden) * 4


def test_adapters_reading_one_tensor_compute_it_again_once_and_it_is_not_held_after() -> None:
    import gc

    from tunesmith.models import recompute

    x = torch.randn(4, 8)
    calls: list[int] = []

    def compute(t: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return t * 2

    out = recompute.mark(x * 2, compute, x)
    again = [recompute.recipe(out) for _ in range(3)]  # the query, key and value adapters
    values = [f(*inputs) for f, inputs in filter(None, again)]
    assert len(values) == 3 and len(calls) == 1 and all(v is values[0] for v in values)
    assert torch.equal(values[0], x * 2)
    del again, out, values
    gc.collect()
    assert recompute._last.value is None  # nothing can ask for it any more


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_what_an_adapter_computes_again_from_is_released_with_the_backward_pass(
    tiny_llama: Path, dropout: float
) -> None:
    """The inputs of a recomputation (a norm's input, a gated MLP's gate and up) go with the saved
    tensors: nothing of a step's activations outlives its backward pass while the loss is still held
    (as a training loop holds it until the next step's forward pass is done)."""
    import weakref

    lm = _lm(tiny_llama)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    lm.backbone = peft.get_peft_model(lm.backbone, cfg)
    recompute_lora_dropout(lm.backbone)
    fused_lora.fuse_lora_linears(lm.backbone)
    lm.train()
    gates: list[weakref.ref[torch.Tensor]] = []
    hook = lm.backbone.base_model.model.layers[0].mlp.gate_proj.register_forward_hook(
        lambda module, args, out: gates.append(weakref.ref(out))
    )
    ids = torch.randint(0, 100, (2, 9))
    loss = lm(ids, torch.ones_like(ids)).hidden.pow(2).sum()
    hook.remove()
    assert gates[0]() is not None  # kept for the backward pass
    loss.backward()
    assert gates[0]() is None and loss.grad_fn is not None


def test_the_loss_chunk_probe_times_each_candidate_per_token_and_weighs_its_logits() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    result = kernels._probe_loss_chunk([256, 512], vocab=500, width=16, weight_trains=False, runtime=CPU)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(result["measured"]) == {"256", "512"} and result["choice"] in (256, 512)
    small, large = result["measured"]["256"], result["measured"]["512"]
    assert small["ms_per_1k_tokens"] > 0 and large["ms_per_1k_tokens"] > 0
    assert large["logits_mb"] == 2 * small["logits_mb"] == round(512 * 500 * 4 / 2**20, 1)  # fp32 logits


def test_a_run_measures_its_loss_chunk_and_its_losses_use_it(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunesmith.tasks.sft import objective

    probed: list[list[int]] = []

    def probe(candidates: list[int], *args: Any) -> dict:
        probed.append(candidates)
        return {"choice": 256, "measured": {}}

    monkeypatch.setattr(kernels, "_probe_loss_chunk", probe)
    chunks: list[int | None] = []
    real = objective.linear_cross_entropy
    monkeypatch.setattr(
        objective, "linear_cross_entropy", lambda h, w, y, chunk=None: (chunks.append(chunk), real(h, w, y, chunk))[1]
    )
    config = {
        "model": {"name": str(tiny_llama), "attention": "sdpa"},
        "task": "sft",
        "method": {"name": "lora", "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "qa.jsonl", _qa(16))), "validation": None, "max_length": 40},
        "train": {"epochs": 1, "batch_size": 16, "max_steps": 1, "precision": "fp32"},
        "eval": {"samples": 0},
        "output": str(tmp_path / "runs"),
    }
    plan = json.loads((tunesmith.train(config).run_dir / "plan.json").read_text())
    # candidates up to the first that holds a micro-batch whole (16 rows of 33-40 tokens here)
    assert probed == [[256, 512, 1024]]
    assert plan["kernels"]["loss_chunk"]["choice"] == 256
    assert chunks and set(chunks) == {256}


def test_the_layout_probe_times_both_memory_formats_and_leaves_the_model_as_it_was() -> None:
    from tunesmith.config import ModelConfig
    from tunesmith.models.image import build_image_classifier

    model = build_image_classifier(ModelConfig(name="efficientnet-lite0", pretrained=False), 3, 0)
    model.input_size = 32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert kernels._layout_matters(model)
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    result = kernels._probe_layout(model, rows=2, size=32, runtime=CPU)
    assert torch.equal(torch.get_rng_state(), rng)
    assert set(result["measured"]) == {"channels_last", "contiguous"} and result["choice"] in result["measured"]
    assert all(m["ms"] > 0 for m in result["measured"].values())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert all(p.grad is None for p in model.parameters())
    assert model.memory_format == torch.channels_last and model.head.weight.is_contiguous()
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    model.backbone.requires_grad_(False)
    assert not kernels._layout_matters(model)  # a frozen backbone's work is cached before training


def test_the_layout_probe_lays_the_model_out_between_timed_calls_not_inside_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [0.0]
    layouts: list[torch.memory_format] = []

    class Net(nn.Module):
        memory_format = torch.contiguous_format

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(1))

        def use_memory_format(self, layout: torch.memory_format) -> None:
            clock[0] += 1.0  # copying every weight: slow
            layouts.append(layout)
            self.memory_format = layout

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            clock[0] += 0.002 if self.memory_format == torch.channels_last else 0.003
            return self.w * 2

    monkeypatch.setattr(kernels.time, "perf_counter", lambda: clock[0])
    result = kernels._probe_layout(Net(), rows=1, size=4, runtime=CPU)
    assert result["measured"]["channels_last"]["ms"] == 2.0 and result["measured"]["contiguous"]["ms"] == 3.0
    assert result["choice"] == "channels_last" and len(layouts) > 2


def test_the_conv_precision_probe_times_both_precisions_and_leaves_the_model_as_it_was() -> None:
    from tunesmith.config import ModelConfig
    from tunesmith.models.image import build_image_classifier

    model = build_image_classifier(ModelConfig(name="efficientnet-lite0", pretrained=False), 3, 0).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layout = model.memory_format
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    result = runtime._measure_conv_precision(model, rows=2, size=32)
    assert torch.equal(torch.get_rng_state(), rng)
    layouts = ("channels_last", "contiguous")
    assert set(result["measured_ms"]) == {f"{p} {name}" for p in ("fp32", "bf16") for name in layouts}
    assert all(ms > 0 for ms in result["measured_ms"].values())
    best = {p: min(result["measured_ms"][f"{p} {name}"] for name in layouts) for p in ("fp32", "bf16")}
    assert result["choice"] == ("bf16" if 1.1 * best["bf16"] < best["fp32"] else "fp32")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and batch-norm statistics
    assert all(p.grad is None for p in model.parameters())
    assert model.memory_format == layout and not model.training


@pytest.mark.parametrize("measured", ["bf16", "fp32"])
def test_a_conv_net_that_trains_takes_the_precision_its_own_probe_measured(
    measured: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import make_tiny_resnet, write_halves_npz

    probed: list[tuple[int, int]] = []

    def probe(model: nn.Module, rows: int, size: int) -> dict:
        probed.append((rows, size))
        return {"choice": measured, "measured_ms": {}}

    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))  # measured here, not recalled
    monkeypatch.setattr(runtime, "_bf16_instructions", lambda: True)
    monkeypatch.setattr(runtime, "_measure_conv_precision", probe)
    result = tunesmith.train(
        model=str(make_tiny_resnet(tmp_path / "resnet")),
        task="image-classification",
        method="full",
        data={"train": str(write_halves_npz(tmp_path / "halves.npz")), "validation": 0.25, "image_size": 32},
        train={"epochs": 1, "batch_size": 8, "max_steps": 2, "precision": "auto"},
        output={"dir": str(tmp_path / "runs")},
    )
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert probed == [(8, 32)]  # once: the plan recalls what the runtime measured
    assert plan["precision"] == result.metrics["train"]["precision"] == measured
    assert plan["conv_precision_probe"]["choice"] == measured


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_a_conv_net_trains_and_reloads_in_the_layout_its_probe_chose(
    layout: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from conftest import make_tiny_resnet, write_halves_npz
    from tunesmith import api
    from tunesmith.inference import load_trained

    monkeypatch.setattr(kernels, "_probe_layout", lambda model, rows, size, runtime: {"choice": layout})
    seen: list[torch.memory_format] = []
    real = kernels.choose_kernels

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> dict:
        chosen = real(model, *args, **kwargs)
        seen.append(model.memory_format)
        return chosen

    monkeypatch.setattr(api, "choose_kernels", spy)  # a run chooses before the task prepares its items
    result = tunesmith.train(
        model=str(make_tiny_resnet(tmp_path / "resnet")),
        task="image-classification",
        method="full",
        data={"train": str(write_halves_npz(tmp_path / "halves.npz")), "validation": 0.25},
        train={"epochs": 1, "batch_size": 8, "max_steps": 2, "precision": "fp32"},
        output={"dir": str(tmp_path / "runs")},
    )
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert plan["kernels"]["memory_format"]["choice"] == layout
    assert seen == [kernels.MEMORY_FORMATS[layout]]
    assert load_trained(result.run_dir).model.memory_format == kernels.MEMORY_FORMATS[layout]


def test_the_probes_measure_at_the_rows_a_training_pass_runs_not_the_items_a_step_takes() -> None:
    from tunesmith.tasks.base import BaseObjective
    from tunesmith.tasks.dpo import DpoObjective
    from tunesmith.tasks.reward import RewardObjective
    from tunesmith.tasks.rl.objective import RlObjective

    class Rows(BaseObjective):
        @staticmethod
        def length(item: dict) -> int:
            return len(item["ids"])

    items = [{"ids": [1] * 30}, {"ids": [1] * 500}]
    assert kernels.pass_shape(Rows(None), items, 8) == ([30, 500], 8)
    assert DpoObjective.rows_per_item == RewardObjective.rows_per_item == 2  # chosen and rejected rows
    tokenizer = types.SimpleNamespace(pad_token_id=0, eos_token_id=0)
    rl = RlObjective(tokenizer, 512, types.SimpleNamespace(group_size=4, max_new_tokens=32), reward=None)  # type: ignore[arg-type]
    prompts = [{"prompt_ids": [1] * 480}, {"prompt_ids": [1] * 100}]
    # 2 prompts a step, 4 samples each, up to 32 tokens longer than their prompt: passes of 8 rows
    assert kernels.pass_shape(rl, prompts, 2) == ([512, 132], 8)
