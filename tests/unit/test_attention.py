"""Attention with dropout that keeps no (query x key) tensor (training/attention.py): the values and
gradients of softmax, dropout and the weighted sum, what it keeps, and a classifier that trains on it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tunesmith.runtime import Runtime
from tunesmith.training import kernels
from tunesmith.training.attention import ATTENTION, additive, dropped_attention
from tunesmith.training.dropout import _drop_mask


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))


def _qkv(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3)]


def test_it_computes_softmax_dropout_and_the_weighted_sum_with_their_gradients() -> None:
    """Against the unfused formula with the very mask it drew (the RNG replayed)."""
    q, k, v = _qkv((2, 3, 6, 4))
    allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    allowed[0, :, :, 4:] = False  # padding in the first row
    state = torch.get_rng_state()
    out = dropped_attention(q, k, v, additive(allowed), 0.3, 0.5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))

    torch.set_rng_state(state)
    drop, keep = _drop_mask(torch.Size((2, 3, 6, 6)), 0.3, torch.device("cpu"))
    assert 0 < drop.float().mean() < 0.6  # it did drop
    probs = (q @ k.transpose(-1, -2) * 0.5).masked_fill(~allowed, float("-inf")).softmax(-1)
    expected = probs.masked_fill(drop, 0) * keep @ v
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)


def test_its_gradients_pass_gradcheck() -> None:
    q, k, v = _qkv((1, 2, 5, 3), torch.float64)
    bias = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    bias[..., -1] = torch.finfo(torch.float64).min

    def seeded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        torch.manual_seed(1)  # the same mask on every call gradcheck makes
        return dropped_attention(q, k, v, bias, 0.25, 0.7)

    assert torch.autograd.gradcheck(seeded, (q, k, v))


def test_it_keeps_no_query_by_key_tensor_where_torchs_kernel_keeps_three() -> None:
    q, k, v = _qkv((4, 2, 32, 8))
    square = {(32, 32)}

    def kept(fn: object) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()  # type: ignore[operator]
        return [s for s in shapes if s[-2:] in square]

    assert kept(lambda: dropped_attention(q, k, v, None, 0.1, 8**-0.5)) == []
    assert len(kept(lambda: F.scaled_dot_product_attention(q, k, v, dropout_p=0.1))) >= 2


def test_a_model_set_to_it_evaluates_as_with_torchs_kernel_and_trains(tiny_bert: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    ids = torch.tensor([[2, 5, 6, 7, 3, 0], [2, 8, 9, 3, 0, 0]])
    mask = (ids != 0).long()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
    kernels._set_attention(model, ATTENTION)
    assert model.config._attn_implementation == ATTENTION
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, before)
    model.train()
    shapes: list[tuple[int, ...]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    out.sum().backward()
    assert not [s for s in shapes if s[-2:] == (6, 6) and len(s) == 4 and s[1] > 1]  # no (batch, heads, q, k)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.encoder.parameters())


def test_the_probe_runs_where_the_attention_drops_and_trains_only(tiny_bert: Path) -> None:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert)
    assert kernels._attention_dropout(model, model.config) == pytest.approx(0.1)
    model.config.attention_probs_dropout_prob = 0.0
    assert kernels._attention_dropout(model, model.config) == 0.0
    model.config.attention_probs_dropout_prob = 0.1
    model.requires_grad_(False)  # a frozen backbone: its attention runs without gradients
    assert kernels._attention_dropout(model, model.config) == 0.0
    runtime = Runtime(torch.device("cpu"), "fp32", 8)
    probe = kernels._probe_dropped_attention((2, 2, 16, 8), 0.1, runtime)
    assert set(probe["measured"]) == {"sdpa", ATTENTION} and probe["choice"] in probe["measured"]
