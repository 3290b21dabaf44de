"""EfficientNet-Lite0's lean training step: the same loss, gradients and batch-norm statistics as
the stock network, a third of the activations kept, and the stock path wherever it does not apply."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

from tunesmith.config import ModelConfig
from tunesmith.models.efficientnet import EfficientNetLite0
from tunesmith.models.image import build_image_classifier
from tunesmith.models.lean_mbconv import all_blocks, lean_features, takes_lean_path


def _twins(memory_format: torch.memory_format) -> tuple[EfficientNetLite0, EfficientNetLite0, torch.Tensor]:
    torch.manual_seed(0)
    net = EfficientNetLite0(num_classes=5).train().to(memory_format=memory_format)  # type: ignore[call-overload]
    # images of an odd size: the stride-2 layers pad one row and column more at the bottom and right
    x = torch.randn(4, 3, 45, 45).contiguous(memory_format=memory_format)
    return net, copy.deepcopy(net), x


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
def test_the_lean_step_matches_the_stock_network_and_keeps_a_third_of_its_activations(
    memory_format: torch.memory_format,
) -> None:
    stock, lean, x = _twins(memory_format)
    assert takes_lean_path(lean, all_blocks(lean), x)
    loss, kept = _activations_kept(stock, lambda: stock.classifier(stock.features(x)).logsumexp(-1).mean())
    lean_loss, lean_kept = _activations_kept(lean, lambda: lean.classifier(lean_features(lean, x)).logsumexp(-1).mean())
    loss.backward()
    lean_loss.backward()

    assert torch.allclose(lean_loss, loss, rtol=1e-6, atol=0)
    for (name, p), q in zip(stock.named_parameters(), lean.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.allclose(q.grad, p.grad, rtol=1e-4, atol=1e-6 * p.grad.abs().max().item()), name
    for (name, a), b in zip(stock.named_buffers(), lean.buffers(), strict=True):
        assert torch.allclose(b.float(), a.float(), rtol=1e-6, atol=1e-7), name  # running statistics, batches seen
    # 30% here (4 images of 45 px); 88 against 248 MB with the weights at 32 images of 64 px
    assert lean_kept < 0.35 * kept


def _activations_kept(net: EfficientNetLite0, step: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """The loss of `step` and the bytes autograd kept for its backward pass, the weights left out."""
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    return loss, sum(kept.values())


def test_the_stock_path_runs_where_the_lean_one_does_not_apply() -> None:
    net, _, x = _twins(torch.contiguous_format)
    blocks = all_blocks(net)
    with torch.no_grad():
        assert not takes_lean_path(net, blocks, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not takes_lean_path(net, blocks, x)
    net.stages[3][0].expand_bn.eval()  # frozen statistics
    assert not takes_lean_path(net, blocks, x)
    assert takes_lean_path(net, all_blocks(net, 4), x)  # the blocks after it still can


def test_an_image_classifier_trains_its_conv_net_on_the_lean_path_and_evaluates_on_the_stock_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tunesmith.models.image as image

    calls: list[int] = []
    monkeypatch.setattr(image, "lean_features", lambda net, x: (calls.append(1), lean_features(net, x))[1])
    model = build_image_classifier(ModelConfig(name="efficientnet-lite0", pretrained=False), 3, 0)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    model(pixel_values=x).sum().backward()
    assert calls == [1]
    model.eval()
    with torch.no_grad():
        model(pixel_values=x)
    assert calls == [1]
