"""The chunked, fused output-layer loss against plain full-logits cross-entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tunesmith.losses.lm import linear_cross_entropy, token_losses


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
