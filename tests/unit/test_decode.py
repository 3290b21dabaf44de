"""The lean decoding step stands in for `transformers`' forward exactly where it runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tunesmith.models import decode, packed
from tunesmith.models.causal_lm import CausalLM, base_decoder
from tunesmith.models.generate import Sampling, _generate, _inverse_cdf, _prefill


def _causal_lm(family: str, **extra: Any) -> CausalLM:
    """A tiny 2-layer decoder of `family` with grouped-query attention, built in-process."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    kinds = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    config_class, model_class = kinds[family]
    model = model_class(config_class(**shape, **extra)).eval()
    for name, p in model.named_parameters():  # biases start at zero; make them count
        if name.endswith("bias"):
            torch.nn.init.normal_(p, std=0.5)
    return CausalLM(model.model, model.lm_head).eval()


def _steps(
    lm: CausalLM, prompts: list[list[int]], tokens: torch.Tensor, bf16: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Hidden states of feeding `tokens` (steps, B) after `prompts`, by the lean step and by the
    model's own forward, both continuing the same prefill (under bf16 autocast with `bf16`)."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return _steps_here(lm, prompts, tokens)


def _steps_here(
    lm: CausalLM, prompts: list[list[int]], tokens: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    decoder = base_decoder(lm.backbone)
    with torch.no_grad():
        _, cache, mask, positions = _prefill(lm.backbone, decoder, ids, mask)
        lean = decode.lean_decoder(decoder, lm.lm_head, cache, mask, len(prompts), len(tokens))
        assert lean is not None
        assert lean.dtype == (torch.bfloat16 if torch.is_autocast_enabled("cpu") else torch.float32)
        ours = []
        for step, token in enumerate(tokens):
            ours.append(lean(token, positions + step))
        theirs = []
        for step, token in enumerate(tokens):
            mask = torch.cat([mask, torch.ones((len(prompts), 1), dtype=mask.dtype)], dim=1)
            out = decoder(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=(positions + step)[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache = out.past_key_values
            theirs.append(out.last_hidden_state[:, -1])
    return ours, theirs


@pytest.mark.parametrize(
    ("family", "extra"),
    [("llama", {}), ("llama", {"attention_bias": True, "mlp_bias": True}), ("qwen2", {})],
    ids=["llama", "llama-with-biases", "qwen2-qkv-bias"],
)
def test_the_lean_step_gives_the_models_own_hidden_states(family: str, extra: dict[str, Any]) -> None:
    lm = _causal_lm(family, **extra)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]  # left padding differs per row
    tokens = torch.randint(1, 97, (6, 3), generator=torch.Generator().manual_seed(1))
    ours, theirs = _steps(lm, prompts, tokens)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.allclose(mine, reference, atol=1e-5, rtol=1e-4)
    greedy = Sampling(max_new_tokens=8)
    assert _generate(lm, prompts, set(), greedy, 0, None) == _generate(lm, prompts, set(), greedy, 0, None, lean=False)


def test_lora_adapters_are_merged_into_the_lean_steps_weights_and_disabling_them_is_honoured() -> None:
    from peft import LoraConfig, get_peft_model

    lm = _causal_lm("llama")
    lm.backbone = get_peft_model(
        lm.backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    )
    prompts = [[5, 6, 7], [8, 9]]
    tokens = torch.randint(1, 97, (4, 2), generator=torch.Generator().manual_seed(2))
    ours, theirs = _steps(lm, prompts, tokens)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(ours, theirs, strict=True))
    with lm.backbone.disable_adapter():
        base_ours, base_theirs = _steps(lm, prompts, tokens)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-4) for a, b in zip(base_ours, base_theirs, strict=True))
    assert not torch.allclose(ours[-1], base_ours[-1], atol=1e-3)  # the adapters did change the states


def test_what_the_lean_step_cannot_reproduce_keeps_the_models_forward() -> None:
    from peft import IA3Config, get_peft_model

    lm = _causal_lm("llama")
    lm.backbone = get_peft_model(
        lm.backbone, IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])
    )
    decoder = base_decoder(lm.backbone)
    ids, mask = torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long)
    with torch.no_grad():
        _, cache, mask, _ = _prefill(lm.backbone, decoder, ids, mask)
    assert decode._unsupported(decoder, cache, 3, 4) == "k_proj is neither a linear nor a LoRA linear"
    assert decode.lean_decoder(decoder, lm.lm_head, cache, mask, 1, 4) is None
    # and generation still works, through the model's own forward
    assert len(_generate(lm, [[5, 6, 7]], set(), Sampling(max_new_tokens=4), 0, None)[0]) == 4


def test_a_sliding_window_within_reach_keeps_the_models_forward() -> None:
    lm = _causal_lm("qwen2", use_sliding_window=True, sliding_window=6)
    decoder = base_decoder(lm.backbone)
    with torch.no_grad():
        _, cache, _, _ = _prefill(lm.backbone, decoder, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert decode._unsupported(decoder, cache, 3, 4) == "sliding window within reach"
    assert decode._unsupported(decoder, cache, 3, 3) is None


@pytest.mark.parametrize("kernel", packed.LINEAR_KERNELS)
def test_every_linear_kernel_computes_the_same_product(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if kernel == "packed" and not packed._available():
        pytest.skip("this torch has no oneDNN")
    monkeypatch.setattr(decode, "fastest_linear", lambda weight, rows, steps: kernel)
    first, second = torch.nn.Linear(24, 40), torch.nn.Linear(24, 8, bias=False)
    fused = decode._Linear([first, second], rows=5, steps=3)
    assert fused.kernel == kernel
    x = torch.randn(5, 24)
    with torch.no_grad():
        expected = torch.cat([first(x), second(x)], -1)
    assert torch.allclose(fused(x), expected, atol=1e-5)


def test_the_fastest_linear_counts_the_reorder_against_the_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    if not packed._available():
        pytest.skip("this torch has no oneDNN")
    timings = {"plain": 1.0, "packed": 0.5, "weights-first": 0.8, "reorder": 10.0}
    monkeypatch.setattr(packed, "linear_timings", lambda weight, rows: timings)
    weight = torch.zeros(128, 128)
    assert packed.fastest_linear(weight, 16, steps=5) == "weights-first"  # 4 ms against 12.5 with the reorder
    assert packed.fastest_linear(weight, 16, steps=100) == "packed"  # 60 ms against 80
    assert packed.fastest_linear(weight.double(), 16, steps=100) == "plain"  # only fp32 and bf16 are measured
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert packed.fastest_linear(weight.bfloat16(), 16, steps=100) == "packed"


def test_the_probe_times_every_kernel_and_the_reorder() -> None:
    if not packed._available():
        pytest.skip("this torch has no oneDNN")
    measured = packed._time_kernels(torch.randn(64, 64), rows=4)
    assert set(measured) == {*packed.LINEAR_KERNELS, "reorder"}
    assert all(ms > 0 for ms in measured.values())


def test_inverse_cdf_across_blocks_draws_each_token_by_its_probability_and_never_a_zero() -> None:
    probs = torch.zeros(22)
    probs[[1, 6, 7, 15, 21]] = torch.tensor([0.1, 0.25, 0.05, 0.4, 0.2])  # blocks of 4: two hold nothing
    rows = 40_000
    u = torch.rand(rows, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = _inverse_cdf(probs.expand(rows, -1) * 3.0, u, width=4)  # unnormalised, as allowed
    counts = torch.bincount(drawn, minlength=22).double() / rows
    assert counts[probs == 0].sum() == 0
    assert torch.allclose(counts, probs.double(), atol=0.01)
    # the edges of the uniform draw land on tokens of nonzero probability
    edges = _inverse_cdf(probs.expand(2, -1), torch.tensor([[0.0], [1.0 - 2**-52]], dtype=torch.float64), width=4)
    assert edges.tolist() == [1, 21]


def test_linear_timings_are_kept_per_shape_and_power_of_two_of_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    keys: list[str] = []
    monkeypatch.setattr(packed, "remembered", lambda key, measure, file: (keys.append(key), measure())[1])
    monkeypatch.setattr(packed, "_time_kernels", lambda weight, rows: {"rows": rows})
    weight = torch.zeros(96, 64)
    assert [packed.linear_timings(weight, rows)["rows"] for rows in (1, 3, 4, 5, 16)] == [1, 4, 4, 8, 16]
    assert keys[1].startswith("decode-linear-kernels|rows 4|(96, 64)|")


def test_low_precision_weights_outside_bf16_autocasts_matmuls_keep_the_models_forward() -> None:
    lm = _causal_lm("llama")
    decoder = base_decoder(lm.backbone)
    with torch.no_grad():
        _, cache, _, _ = _prefill(lm.backbone, decoder, torch.tensor([[5, 6, 7]]), torch.ones(1, 3, dtype=torch.long))
    assert decode._unsupported(decoder, cache, 3, 4) is None
    decoder.layers[1].mlp.down_proj.to(torch.bfloat16)  # as frozen weights are kept under bf16 precision
    bf16 = "parameters in torch.bfloat16 outside bf16 autocast's matmuls"
    assert decode._unsupported(decoder, cache, 3, 4) == bf16  # no autocast: transformers would multiply in bf16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert decode._unsupported(decoder, cache, 3, 4) is None
        decoder.layers[0].input_layernorm.to(torch.bfloat16)  # a norm in bf16 computes differently
        assert decode._unsupported(decoder, cache, 3, 4) == bf16
    with torch.autocast("cpu", dtype=torch.float16):
        assert decode._unsupported(decoder, cache, 3, 4) == "autocast to a dtype other than bf16"


def test_under_bf16_autocast_the_lean_step_multiplies_in_bf16_within_autocasts_rounding() -> None:
    import copy

    from peft import LoraConfig, get_peft_model

    from tunesmith.training.loop import frozen_matmuls_to_bf16

    lm = _causal_lm("llama", attention_bias=True)
    lm.backbone = get_peft_model(
        lm.backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    )
    exact = copy.deepcopy(lm)  # fp32 throughout
    trained = {name for name, p in lm.named_parameters() if p.requires_grad}
    assert frozen_matmuls_to_bf16(lm, trained) > 0  # as a LoRA run under bf16 keeps its frozen weights
    prompts = [[5, 6, 7, 8], [9, 10]]
    tokens = torch.randint(1, 97, (5, 2), generator=torch.Generator().manual_seed(3))
    ours, theirs = _steps(lm, prompts, tokens, bf16=True)
    fp32, _ = _steps(exact, prompts, tokens)
    for mine, autocast, true in zip(ours, theirs, fp32, strict=True):
        rounding = (autocast - true).abs().max()
        assert rounding > 0  # autocast did round
        assert (mine - autocast).abs().max() <= 2 * rounding  # no further from autocast than its own rounding allows
        assert mine.dtype == torch.float32  # the residual stream stays fp32
    # generation through it under autocast gives tokens of the right count
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _generate(lm, prompts, set(), Sampling(max_new_tokens=6, temperature=1.0), 0, None)
    assert [len(o) for o in out] == [6, 6]
