"""EfficientNet-Lite0 in plain torch: shapes with random init, the seeded head, preprocessing, key mapping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tunesmith.errors import ConfigError
from tunesmith.models.efficientnet import (
    EfficientNetLite0,
    convert_state_dict,
    new_classifier,
    preprocess,
)


@pytest.fixture(scope="module")
def model() -> EfficientNetLite0:
    torch.manual_seed(0)
    return EfficientNetLite0(num_classes=7).eval()


def test_forward_and_features_shapes(model: EfficientNetLite0) -> None:
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.features(x).shape == (2, 1280)
    assert len(model.stages) == 7
    assert [len(stage) for stage in model.stages] == [1, 2, 2, 3, 3, 4, 1]


def test_same_padding_halves_odd_and_even_sides(model: EfficientNetLite0) -> None:
    # TF "SAME": a stride-2 conv gives ceil(n / 2), on odd and even inputs alike.
    with torch.no_grad():
        assert model.stem_conv(torch.zeros(1, 3, 65, 64)).shape == (1, 32, 33, 32)


def test_new_head_is_seeded() -> None:
    a, b, c = new_classifier(10, seed=3), new_classifier(10, seed=3), new_classifier(10, seed=4)
    assert a.weight.shape == (10, 1280)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert not torch.equal(a.weight, c.weight)
    assert torch.count_nonzero(a.bias) == 0


def test_new_head_leaves_global_rng_alone() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    new_classifier(10, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_new_head_rejects_zero_classes() -> None:
    with pytest.raises(ConfigError, match="num_classes"):
        new_classifier(0)


def test_preprocess_rgb_scaling() -> None:
    image = np.full((300, 400, 3), 255, dtype=np.uint8)
    image[..., 1] = 127
    image[..., 2] = 0
    x = preprocess(image)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    # (x - 127) / 128 per channel: 255 -> 1.0, 127 -> 0.0, 0 -> -127/128
    assert torch.allclose(x[0], torch.tensor(1.0))
    assert torch.allclose(x[1], torch.tensor(0.0))
    assert torch.allclose(x[2], torch.tensor(-127 / 128))


def test_preprocess_grayscale_becomes_three_equal_channels() -> None:
    image = np.tile(np.arange(200, dtype=np.uint8), (150, 1))  # (150, 200) horizontal ramp
    x = preprocess(image)
    assert x.shape == (3, 224, 224)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert x.min() >= -127 / 128 and x.max() <= 1.0


def test_preprocess_centre_crops_after_resizing_shorter_side() -> None:
    # A 100x400 image: the shorter side goes to 256, the long side to 1024; the crop is the centre
    # 224 columns, so a bright stripe at the left edge is cropped away.
    image = np.zeros((100, 400), dtype=np.uint8)
    image[:, :50] = 255
    x = preprocess(image)
    assert torch.allclose(x, torch.tensor(-127 / 128))
    assert preprocess(image, size=112).shape == (3, 112, 112)


def test_preprocess_rejects_bad_input() -> None:
    with pytest.raises(ConfigError, match="uint8"):
        preprocess(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(ConfigError, match="PIL image"):
        preprocess([[0, 1]])


def test_convert_state_dict_matches_module_names(model: EfficientNetLite0) -> None:
    # Build a state dict under the EfficientNet-PyTorch names from the model's own and map it back.
    top = {"stem_conv": "_conv_stem", "stem_bn": "_bn0", "head_conv": "_conv_head", "head_bn": "_bn1"}
    block = {"expand_conv": "_expand_conv", "expand_bn": "_bn0", "depthwise_conv": "_depthwise_conv"}
    block |= {"depthwise_bn": "_bn1", "project_conv": "_project_conv", "project_bn": "_bn2"}
    offsets = np.cumsum([0] + [len(s) for s in model.stages])
    ported = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if parts[0] == "stages":
            index = offsets[int(parts[1])] + int(parts[2])
            ported[f"_blocks.{index}.{block[parts[3]]}.{parts[4]}"] = value
        elif parts[0] == "classifier":
            ported[f"_fc.{parts[1]}"] = value
        else:
            ported[f"{top[parts[0]]}.{parts[1]}"] = value
    assert "_blocks.15._project_conv.weight" in ported
    converted = convert_state_dict(ported)
    assert converted.keys() == model.state_dict().keys()
    with pytest.raises(ConfigError, match="_blocks.0._se_reduce"):
        convert_state_dict({"_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_a_text_task_refuses_the_image_model() -> None:
    from tunesmith.config import ModelConfig
    from tunesmith.errors import ConfigError
    from tunesmith.models.load import load_tokenizer

    with pytest.raises(ConfigError, match="an image model, which text tasks cannot use"):
        load_tokenizer(ModelConfig(name="efficientnet-lite0"))
