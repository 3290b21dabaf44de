"""Evidence: the packaged EfficientNet-Lite0 weights load strictly into the pure-torch model and
classify a photo of a cat (skimage's "chelsea") as a cat."""

from __future__ import annotations

import pytest
import torch

from tunesmith.models.efficientnet import load_efficientnet_lite0, preprocess

pytestmark = pytest.mark.slow

CAT_CLASSES = {281: "tabby", 282: "tiger cat", 283: "Persian", 284: "Siamese", 285: "Egyptian cat"}


def test_packaged_weights_classify_the_cat() -> None:
    data = pytest.importorskip("skimage.data")
    model = load_efficientnet_lite0().eval()  # strict load; raises on any missing or extra key
    with torch.no_grad():
        probs = model(preprocess(data.chelsea())[None]).softmax(-1)[0]  # (1000,)
    top = int(probs.argmax())
    assert top in CAT_CLASSES, f"top-1 class {top} (p={float(probs[top]):.3f}) is not a cat class"
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.8, (
        f"cat classes only p={float(probs[list(CAT_CLASSES)].sum()):.3f}"
    )


def test_new_head_keeps_the_backbone_and_is_seeded() -> None:
    imagenet = load_efficientnet_lite0()
    a, b = load_efficientnet_lite0(num_classes=10), load_efficientnet_lite0(num_classes=10)
    assert a.classifier.out_features == 10
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    assert torch.equal(a.head_conv.weight, imagenet.head_conv.weight)
