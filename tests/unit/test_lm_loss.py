"""The chunked, fused output-layer loss against plain full-logits cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.losses import lm
from tunesmith.losses.lm import cast_weight, linear_cross_entropy, token_logprobs, token_losses


def _reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(hidden @ weight.T, targets)


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
def test_loss_and_gradients_equal_full_logits(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (7,))
    loss = linear_cross_entropy(hidden, weight, targets, chunk=chunk)
    loss.backward()
    got_h, got_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    expected = _reference(hidden, weight, targets)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-12)
    assert torch.allclose(got_h, hidden.grad, atol=1e-12)
    assert torch.allclose(got_w, weight.grad, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_upstream_scale_applies() -> None:
    torch.manual_seed(1)
    hidden = torch.randn(5, 8, requires_grad=True)
    weight = torch.randn(20, 8)  # frozen output layer (LoRA and friends)
    targets = torch.randint(0, 20, (5,))
    (3.0 * linear_cross_entropy(hidden, weight, targets, chunk=2)).backward()
    got = hidden.grad.clone()
    hidden.grad = None
    (3.0 * _reference(hidden, weight, targets)).backward()
    assert torch.allclose(got, hidden.grad, atol=1e-6)
    assert weight.grad is None


def test_bf16_autocast_stays_close_to_fp32() -> None:
    torch.manual_seed(2)
    hidden = torch.randn(64, 32)
    weight = torch.randn(100, 32) * 0.1
    targets = torch.randint(0, 100, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk=16)
    assert loss.dtype == torch.float32
    assert abs(float(loss) - float(_reference(hidden, weight, targets))) < 0.02


def test_token_losses_per_token() -> None:
    torch.manual_seed(3)
    hidden, weight = torch.randn(6, 8), torch.randn(11, 8)
    targets = torch.randint(0, 11, (6,))
    losses, correct = token_losses(hidden, weight, targets, chunk=4)
    logits = hidden @ weight.T
    assert torch.allclose(losses, F.cross_entropy(logits, targets, reduction="none"), atol=1e-6)
    assert torch.equal(correct, logits.argmax(-1) == targets)


def test_no_trained_token_gives_zero_loss_with_a_graph() -> None:
    hidden = torch.randn(0, 8, requires_grad=True)
    loss = linear_cross_entropy(hidden, torch.randn(11, 8), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert float(loss.detach()) == 0.0


def test_the_gradient_is_formed_a_few_rows_at_a_time_exactly_as_over_the_whole_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(4)
    logits = (torch.randn(10, 64) * 3).to(torch.bfloat16)
    targets = torch.randint(0, 64, (10,))
    whole, whole_logp = logits.clone(), torch.empty(10)
    lm._softmax_rows(whole, targets, whole_logp, torch.float32)
    monkeypatch.setattr(lm, "_BLOCK_ELEMENTS", 3 * 64)  # blocks of 3 rows: 3, 3, 3 and 1
    got, target_logp = logits.clone(), torch.empty(10)
    lm._softmax_rows(got, targets, target_logp, torch.float32)
    assert torch.equal(got, whole) and torch.equal(target_logp, whole_logp)
    logp = logits.float().log_softmax(-1)
    expected = (logp.exp() - F.one_hot(targets, 64)).to(torch.bfloat16)  # one rounding, from fp32
    assert torch.allclose(got.float(), expected.float(), rtol=2**-8, atol=1e-7)
    assert torch.allclose(target_logp, logp[torch.arange(10), targets], atol=1e-5)


def test_bf16_loss_and_gradient_are_those_of_fp32_log_softmax_over_bf16_logits() -> None:
    torch.manual_seed(6)
    hidden = torch.randn(40, 32, requires_grad=True)
    weight = torch.randn(300, 32) * 0.1
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, targets, chunk=16)
    loss.backward()
    h, w = hidden.detach().bfloat16(), weight.bfloat16()
    logp = (h @ w.T).float().log_softmax(-1)
    g = ((logp.exp() - F.one_hot(targets, 300)) / 40).to(torch.bfloat16)
    assert torch.allclose(loss, -logp[torch.arange(40), targets].mean(), atol=1e-6)
    assert torch.allclose(hidden.grad, (g @ w).float(), rtol=0.02, atol=1e-4)


def test_token_logprobs_and_their_gradient_equal_full_logits() -> None:
    torch.manual_seed(7)
    hidden = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 16, dtype=torch.float64)
    targets = torch.randint(0, 40, (9,))
    upstream = torch.randn(9, dtype=torch.float64)
    (token_logprobs(hidden, weight, targets, chunk=4) * upstream).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    expected = (hidden @ weight.T).log_softmax(-1)[torch.arange(9), targets]
    (expected * upstream).sum().backward()
    assert torch.allclose(got, hidden.grad, atol=1e-12)


def test_a_frozen_weight_is_cast_once_and_again_only_when_it_changes() -> None:
    frozen = torch.randn(30, 8)
    first = cast_weight(frozen, torch.bfloat16)
    assert cast_weight(frozen, torch.bfloat16) is first
    frozen.mul_(2.0)  # changed in place (a loaded checkpoint, a merged adapter)
    again = cast_weight(frozen, torch.bfloat16)
    assert again is not first and torch.equal(again, frozen.bfloat16())
    trained = torch.randn(30, 8, requires_grad=True)  # changes every step: never kept
    assert cast_weight(trained, torch.bfloat16) is not cast_weight(trained, torch.bfloat16)
    assert cast_weight(frozen, torch.float32) is frozen


def test_the_kept_cast_goes_with_its_weight() -> None:
    import gc

    frozen = torch.randn(30, 8)
    cast_weight(frozen, torch.bfloat16)
    assert lm._last_weight.entry is not None
    del frozen
    gc.collect()
    assert lm._last_weight.entry is None  # nothing holds a dead weight's cast
