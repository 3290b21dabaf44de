"""The real CLI on the packaged EfficientNet-Lite0 and MNIST digits, a few steps per method."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_tunesmith
from tunesmith.data.transforms import eval_transform
from tunesmith.runtime import resolve_precision
from tunesmith.zoo import packaged_data_rows

pytestmark = pytest.mark.slow


def digits(n: int, offset: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    rows = packaged_data_rows("mnist-5k")[offset : offset + n]
    return np.stack([r["image"] for r, _ in rows]), np.array([int(r["label"]) for r, _ in rows])


@pytest.mark.parametrize(
    ("config", "trained"),
    [
        ("configs/image-feature-extraction.yaml", {"head.weight", "head.bias"}),
        ("configs/image-partial.yaml", {"backbone.stages.6.0.project_conv.weight", "backbone.head_conv.weight"}),
        ("configs/image-lora.yaml", {"backbone.base_model.model.stages.0.0.project_conv.lora_A.default.weight"}),
        ("configs/image-full.yaml", {"backbone.stem_conv.weight", "backbone.stem_bn.running_mean"}),
    ],
)
def test_train_predict_eval(tmp_path: Path, config: str, trained: set[str]) -> None:
    quick = ["data.limit=160", "data.validation=0.02", "data.image_size=32", "train.epochs=1", f"output.dir={tmp_path}"]
    done = run_tunesmith("train", config, *quick)
    assert done.returncode == 0, done.stderr
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "eval.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())
    # On a CPU, a conv net whose convolutions train takes the precision its own probe measured (fp32
    # where the CPU has no bf16 instructions); feature extraction trains none and keeps the machine's default.
    conv_trains = "feature-extraction" not in config and not torch.cuda.is_available()
    probed = plan.get("conv_precision_probe", {"choice": "fp32"})["choice"]
    expected = probed if conv_trains else resolve_precision("auto")
    assert metrics["train"]["steps"] == 5 and metrics["train"]["precision"] == expected
    assert metrics["validation"]["count"] == 100 and "top5_accuracy" in metrics["validation"]
    assert plan["labels"] == [str(d) for d in range(10)] and trained <= set(plan["trainable_names"])

    images, labels = digits(40)
    Image.fromarray(images[0]).save(tmp_path / "digit.png")
    predicted = run_tunesmith("predict", run_dir, tmp_path / "digit.png")
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.split()[0] in [str(d) for d in range(10)]
    np.savez(tmp_path / "held.npz", images=images, labels=labels)
    evaluated = run_tunesmith("eval", run_dir, "--data", tmp_path / "held.npz", "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)
    assert result["count"] == 40 and np.array(result["confusion"]["matrix"]).sum() == 40


def test_the_stage_split_gives_the_full_forward() -> None:
    """What the partial cache relies on: stem + stages 0..k-1, then stages k.., equals the whole net."""
    from tunesmith.config import DataConfig, ModelConfig
    from tunesmith.models.image import build_image_classifier, image_preprocessing

    model = build_image_classifier(ModelConfig(name="efficientnet-lite0"), 10, seed=0).eval()
    pre = image_preprocessing(ModelConfig(name="efficientnet-lite0"), DataConfig(train="x", image_size=64))
    images, _ = digits(4)
    pixels = torch.stack([eval_transform(Image.fromarray(im), pre) for im in images])
    with torch.no_grad():
        full = model.encode(pixels)
        for k in range(1, 8):
            split = model.encode_suffix(model.encode_prefix(pixels, k), k)
            torch.testing.assert_close(split, full, rtol=1e-4, atol=1e-5)


def test_the_pretrained_net_fine_tunes_with_batch_norms_that_keep_up() -> None:
    """The weights came with momentum 0.01 (made for ImageNet's long runs); a fine-tuning run of ~100
    steps gets 0.1, so the statistics follow the weights that train. The weights themselves are ImageNet's."""
    from tunesmith.config import ModelConfig
    from tunesmith.models.efficientnet import load_efficientnet_lite0
    from tunesmith.models.image import build_image_classifier

    model = build_image_classifier(ModelConfig(name="efficientnet-lite0"), 10, seed=0)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(norms) > 40 and {m.momentum for m in norms} == {0.1}
    imagenet = load_efficientnet_lite0().state_dict()
    assert all(torch.equal(v, imagenet[k]) for k, v in model.backbone.state_dict().items())
    assert model.pretrained_lr_scale == 20.0
