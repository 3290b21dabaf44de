"""The CPU dropout: drops each element with probability p, rescales, seeds like torch's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tunesmith.training.dropout import FastDropout, fast_dropout, use_fast_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drops_the_right_share_in_every_lane(p: float) -> None:
    torch.manual_seed(0)
    x = torch.ones(400_000)
    y = fast_dropout(x, p)
    dropped = (y == 0).float()
    # Each element's sample comes from one 16-bit lane of a 64-bit word: check all four lanes.
    for lane in range(4):
        assert float(dropped[lane::4].mean()) == pytest.approx(p, abs=0.006), lane
    kept = y[y != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / (1 - p)), rtol=1e-3)
    assert float(y.mean()) == pytest.approx(1.0, abs=0.01)  # the expectation is preserved


def test_same_seed_same_mask_and_bf16_keeps_dtype() -> None:
    x = torch.randn(3, 5, 7, dtype=torch.bfloat16)
    torch.manual_seed(1)
    a = fast_dropout(x, 0.2)
    torch.manual_seed(1)
    b = fast_dropout(x, 0.2)
    assert torch.equal(a, b) and a.dtype == torch.bfloat16 and a.shape == x.shape


def test_module_is_identity_in_eval_and_swaps_every_dropout() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3), nn.Sequential(nn.Dropout(0.1)))
    assert use_fast_dropout(model) == 2
    assert use_fast_dropout(model) == 0  # already swapped
    assert isinstance(model[1], FastDropout) and model[1].p == 0.3
    model.eval()
    x = torch.randn(8, 4)
    assert torch.equal(model(x), model[0](x))
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros_like(x))


def test_gradient_is_the_same_mask_and_scale() -> None:
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(3)
    y = fast_dropout(x, 0.25)
    y.sum().backward()
    assert x.grad is not None
    expected = (y != 0).float() / (1 - round(0.25 * 32768) / 32768)
    assert torch.allclose(x.grad, expected)


def test_an_empty_tensor_drops_nothing_and_keeps_its_shape() -> None:
    x = torch.randn(2, 0, 5, requires_grad=True)
    out = fast_dropout(x, 0.1)
    assert out.shape == (2, 0, 5)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (2, 0, 5)
