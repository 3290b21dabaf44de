"""A LoRA linear layer's training step fused into one function (training/fused_lora.py): the same
outputs and gradients as peft's forward, the same masks, the same modules and names, peft's own
path wherever the fused one does not apply."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from torch import nn

from tunesmith.methods.lora import recompute_lora_dropout
from tunesmith.training import fused_lora
from tunesmith.training.kernels import saved_bytes


def _model(path: Path, **options: Any) -> nn.Module:
    from tunesmith.config import ModelConfig
    from tunesmith.models.load import build_causal_lm

    lm = build_causal_lm(ModelConfig(name=str(path)), 64)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear", **options)
    lm.backbone = peft.get_peft_model(lm.backbone, cfg)
    recompute_lora_dropout(lm.backbone)
    torch.manual_seed(0)
    for name, param in lm.named_parameters():  # B starts at zero: give the adapters something to add
        if "lora_B" in name:
            nn.init.normal_(param, std=0.5)
    return lm


def _step(lm: nn.Module, ids: torch.Tensor, autocast: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    lm.zero_grad()
    torch.manual_seed(5)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        hidden = lm(ids, torch.ones_like(ids)).hidden
    hidden.float().pow(2).mean().backward()
    return hidden.detach().float(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


def _unfused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fused_lora, "_plain_adapter", lambda *args: None)  # every call takes peft's path


def test_a_fused_training_step_gives_peft_outputs_and_gradients_with_the_same_masks(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lm = _model(tiny_llama)
    names = [n for n, _ in lm.named_parameters()]
    assert fused_lora.fuse_lora_linears(lm.backbone) == 2 * 7  # every linear of 2 layers
    assert [n for n, _ in lm.named_parameters()] == names  # same parameters, same names
    assert all(type(m).__name__ == "Linear" for m in lm.modules() if hasattr(m, "lora_A"))  # as peft names it
    lm.train()
    ids = torch.randint(0, 100, (2, 9))
    calls = []
    apply = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    fused_out, fused_grads = _step(lm, ids)
    assert len(calls) == 14  # the fused path ran for every adapted layer
    _unfused(monkeypatch)
    peft_out, peft_grads = _step(lm, ids)
    torch.testing.assert_close(fused_out, peft_out, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == peft_grads.keys() and len(fused_grads) == 2 * 7 * 2  # A and B of 14 linears
    for name, grad in fused_grads.items():
        torch.testing.assert_close(grad, peft_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_under_bf16_autocast_the_fused_step_is_as_close_to_fp32_as_peft_s(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sums are formed inside the matmuls instead of as separately rounded bf16 tensors: not the
    same bits as peft's path, but about as close to the fp32 result (relative RMS errors, over inputs)."""
    lm = _model(tiny_llama)
    fused_lora.fuse_lora_linears(lm.backbone)
    lm.train()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).norm() / b.norm())

    def errors() -> tuple[float, float]:
        out_error = grad_error = 0.0
        for seed in range(6):
            ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(seed))
            truth, true_grads = _step(lm, ids)
            out, grads = _step(lm, ids, autocast=True)
            out_error += rel(out, truth)
            grad_error += sum(rel(grads[n], g) for n, g in true_grads.items()) / len(true_grads)
        return out_error, grad_error

    fused = errors()
    _unfused(monkeypatch)
    peft_path = errors()
    # measured: output 0.121 against 0.121, gradients 2.25 against 2.01 (sums over 6 inputs)
    assert fused[0] <= 1.25 * peft_path[0] and fused[1] <= 1.25 * peft_path[1], (fused, peft_path)


def test_outside_a_training_step_the_fused_layer_is_peft_s(tiny_llama: Path) -> None:
    lm = _model(tiny_llama)
    ids = torch.randint(0, 100, (2, 7))
    lm.eval()
    before = lm(ids, torch.ones_like(ids)).hidden
    fused_lora.fuse_lora_linears(lm.backbone)
    assert torch.equal(lm(ids, torch.ones_like(ids)).hidden, before)  # evaluation: peft's forward
    from tunesmith.models.decode import _parts

    q = lm.backbone.base_model.model.layers[0].self_attn.q_proj
    parts = _parts(q)  # generation's fused decoding still reads it as a plain LoRA linear
    assert parts is not None and len(parts[2]) == 1


def test_dora_and_trained_base_weights_keep_peft_s_path(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    apply = fused_lora._LoraLinear.apply
    monkeypatch.setattr(fused_lora._LoraLinear, "apply", lambda *a: calls.append(1) or apply(*a))
    dora = _model(tiny_llama, use_dora=True)
    fused_lora.fuse_lora_linears(dora.backbone)
    dora.train()
    dora(torch.randint(0, 100, (1, 5)), torch.ones(1, 5, dtype=torch.long)).hidden.sum().backward()
    assert not calls

    lm = _model(tiny_llama)
    fused_lora.fuse_lora_linears(lm.backbone)
    lm.train()
    q = lm.backbone.base_model.model.layers[0].self_attn.q_proj
    q.base_layer.weight.requires_grad_(True)  # a trained base weight needs its own gradient
    lm(torch.randint(0, 100, (1, 5)), torch.ones(1, 5, dtype=torch.long)).hidden.sum().backward()
    assert len(calls) == 13 and q.base_layer.weight.grad is not None


def test_the_fused_step_keeps_what_folded_dropout_keeps(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The input once or not at all (recomputed norm outputs and gated products), the mask at one bit
    an element and the narrow product: no more than peft's path with the folded dropout."""
    lm = _model(tiny_llama)
    lm.train()
    ids = torch.randint(0, 100, (2, 9))

    def saved() -> int:
        torch.manual_seed(5)
        out, size = saved_bytes(lambda: lm(ids, torch.ones_like(ids)).hidden.pow(2).sum())
        out.backward()
        return size

    unfused = saved()
    fused_lora.fuse_lora_linears(lm.backbone)
    fused = saved()
    assert fused <= unfused
    monkeypatch.setattr(fused_lora, "recipe", lambda t: None)  # keep every adapter input instead
    hidden, inter, tokens = 32, 64, ids.numel()  # tiny_llama's sizes (conftest)
    # per layer: the input norm's output (q, k, v), the post-attention norm's (gate, up), the product
    # (down); but the first block's norm reads the frozen embedding's output, which nothing else keeps:
    # that input is kept in the output's place
    assert saved() - fused == (2 * tokens * (2 * hidden + inter) - tokens * hidden) * 4


def test_the_input_is_cast_once_for_the_adapters_that_read_it() -> None:
    x = torch.randn(4, 8)
    a = fused_lora._cast_once(x, torch.bfloat16)
    assert fused_lora._cast_once(x, torch.bfloat16) is a
    assert fused_lora._cast_once(x, torch.float32) is x
    x.add_(1.0)  # changed in place: cast again
    b = fused_lora._cast_once(x, torch.bfloat16)
    assert b is not a and torch.equal(b, x.to(torch.bfloat16))
    del x
    assert fused_lora._last_cast.value is None  # not held after its source is gone
