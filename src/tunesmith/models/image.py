"""An image classifier: a pre-trained vision backbone, its pooled features, and a new linear head.

The backbone is the packaged EfficientNet-Lite0 (tunesmith's own module) or any Hugging Face
vision model (`AutoModel`: ViT, ResNet, ConvNeXt, ...); the head is new, sized to the task's
classes and seeded. As for text, keeping the head outside the backbone lets a frozen backbone's
features be cached, and lets peft wrap the backbone alone.

Batch-norm layers whose weights do not train stay in eval mode while training: their running
statistics are part of the frozen network, and updating them from a small new data set would
change the features under a frozen head (feature extraction, partial, LoRA).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from tunesmith.config import DataConfig, ModelConfig
from tunesmith.data.transforms import Preprocessing
from tunesmith.errors import ConfigError
from tunesmith.models.efficientnet import INPUT_MEAN, INPUT_STD, EfficientNetLite0, load_efficientnet_lite0
from tunesmith.models.lean_mbconv import all_blocks, lean_blocks, lean_features, pooled_head, takes_lean_path

__all__ = ["ImageClassifier", "build_image_classifier", "image_preprocessing"]

PACKAGED = "efficientnet-lite0"
SHORT_RUN_BN_MOMENTUM = 0.1  # batch norms that follow a run of hundreds of steps (torch's default)


class ImageClassifier(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_labels: int,
        dropout: float = 0.1,
        pretrained_lr_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.pretrained_lr_scale = pretrained_lr_scale  # the backbone family's (plugins.TaskModel)
        self.backbone = backbone
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feature_dim, num_labels)
        # The layout of the weights and of the inputs the forward pass is given: channels-last for a
        # conv net (`build_image_classifier`), remeasured per machine in training (training/kernels.py).
        self.memory_format = torch.contiguous_format
        self.input_size: int | None = None  # the side of the images it is given, where the task knows it

    def has_spatial_convs(self) -> bool:
        """Whether the backbone is a conv net (convolutions wider than 1 x 1), where layout matters."""
        return any(isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) for m in self.backbone.modules())

    def use_memory_format(self, memory_format: torch.memory_format) -> None:
        """Lay out the weights (and from now on the inputs) in `memory_format`."""
        self.to(memory_format=memory_format)  # type: ignore[call-overload]
        self.memory_format = memory_format

    def encode(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pooled features (B, D) of images (B, 3, H, W)."""
        if _is_lite0(self.backbone):
            net = _lite0(self.backbone)
            if takes_lean_path(net, all_blocks(net), pixel_values):
                return lean_features(net, pixel_values)  # a training step keeping a third of the activations
            return self.backbone.features(pixel_values)  # type: ignore[operator,no-any-return]
        out = self.backbone(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)  # ResNet: (B, C, 1, 1) -> (B, C); ConvNeXt: (B, C)
        hidden = out.last_hidden_state
        # ViT-family: the class token after the final norm, as their image classifiers use it.
        return hidden[:, 0] if hidden.ndim == 3 else hidden.mean(dim=(2, 3))

    def can_split(self, k: int) -> bool:
        """Whether the backbone can run from stage `k` on cached feature maps (EfficientNet-Lite0)."""
        return _is_lite0(self.backbone) and 0 < k <= len(_lite0(self.backbone).stages)

    def encode_prefix(self, pixel_values: torch.Tensor, k: int) -> torch.Tensor:
        """The feature map (B, C, H', W') entering stage `k`: the stem and stages 0..k-1."""
        net = _lite0(self.backbone)
        h = torch.nn.functional.relu6(net.stem_bn(net.stem_conv(pixel_values)))
        for stage in net.stages[:k]:
            h = stage(h)
        return h

    def encode_suffix(self, hidden: torch.Tensor, k: int) -> torch.Tensor:
        """Pooled features (B, D) from the feature map entering stage `k`."""
        net = _lite0(self.backbone)
        blocks = all_blocks(net, k)
        if takes_lean_path(net, blocks, hidden):
            return pooled_head(net, lean_blocks(blocks, hidden))
        h = hidden
        for stage in net.stages[k:]:
            h = stage(h)
        return pooled_head(net, h)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        hidden: torch.Tensor | None = None,
        start_block: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """Logits (B, num_labels) from images, from cached pooled `features` (B, D), or from a cached
        feature map `hidden` that enters stage `start_block`."""
        if features is None and hidden is not None:
            features = self.encode_suffix(hidden.contiguous(memory_format=self.memory_format), int(start_block))
        elif features is None:
            assert pixel_values is not None
            features = self.encode(pixel_values.contiguous(memory_format=self.memory_format))
        return self.head(self.dropout(features.to(self.head.weight.dtype)))

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if mode:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                    p.requires_grad for p in module.parameters()
                ):
                    module.eval()  # frozen statistics (see the module docstring)
        return self


def build_image_classifier(cfg: ModelConfig, num_labels: int, seed: int) -> ImageClassifier:
    """Backbone (pre-trained, or randomly initialised from `seed` with `model.pretrained: false`) and a
    new head of `num_labels` outputs seeded from `seed`; fp32, channels-last where it is a conv net."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if cfg.name == PACKAGED:
            net = _fine_tunable(load_efficientnet_lite0()) if cfg.pretrained else _random_lite0()
            net.classifier = nn.Identity()  # type: ignore[assignment]  # the new head replaces it
            backbone: nn.Module = net
            dim, scale = net.head_bn.num_features, net.pretrained_lr_scale
        else:
            # Hugging Face vision models train at the transformer rates (measured on none of their conv
            # nets here: `train.lr: auto` measures one).
            (backbone, dim), scale = _hf_backbone(cfg), 1.0
        model = ImageClassifier(backbone, dim, num_labels, cfg.head_dropout, scale)
    if model.has_spatial_convs():
        # oneDNN's convolutions on CPU ran a training step twice as fast on channels-last memory
        # (EfficientNet-Lite0, 64 px, batch 32: 162 -> 339 images/s); training measures it again
        # on its machine (training/kernels.py).
        model.use_memory_format(torch.channels_last)
    model.train()
    return model


def image_preprocessing(cfg: ModelConfig, data: DataConfig) -> Preprocessing:
    """The model's own preprocessing (its processor's size, crop and normalisation; for the
    packaged EfficientNet-Lite0 the weights' (x - 127) / 128), with `data.image_size` as the side."""
    if cfg.name == PACKAGED:
        size = data.image_size or 224
        return Preprocessing(size, round(size * 256 / 224), (INPUT_MEAN,) * 3, (INPUT_STD,) * 3)  # type: ignore[arg-type]
    proc = _processor_config(cfg)
    rescale = float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0
    mean = proc.get("image_mean", [0.5, 0.5, 0.5]) if proc.get("do_normalize", True) else [0.0] * 3
    std = proc.get("image_std", [0.5, 0.5, 0.5]) if proc.get("do_normalize", True) else [1.0] * 3
    size_spec = proc.get("size", {"height": 224, "width": 224})
    size_spec = {"height": size_spec, "width": size_spec} if isinstance(size_spec, int) else size_spec
    if "shortest_edge" in size_spec:
        native = int(proc.get("crop_size", {}).get("height", size_spec["shortest_edge"]))
        crop_pct = float(proc.get("crop_pct") or native / max(int(size_spec["shortest_edge"]), native))
        size = data.image_size or native
        resize: int | None = round(size / crop_pct)
    else:
        size, resize = data.image_size or int(size_spec.get("height", 224)), None
    return Preprocessing(
        size,
        resize,
        tuple(float(m) / rescale for m in mean),  # type: ignore[arg-type]
        tuple(float(s) / rescale for s in std),  # type: ignore[arg-type]
    )


def _is_lite0(backbone: nn.Module) -> bool:
    return isinstance(_lite0_or_none(backbone), EfficientNetLite0)


def _lite0_or_none(backbone: nn.Module) -> Any:
    # peft wraps the backbone (PeftModel -> LoraModel -> model); look through the wrappers.
    inner: Any = backbone
    for attr in ("base_model", "model"):
        if not isinstance(inner, EfficientNetLite0) and hasattr(inner, attr):
            inner = getattr(inner, attr)
    return inner


def _lite0(backbone: nn.Module) -> EfficientNetLite0:
    net = _lite0_or_none(backbone)
    assert isinstance(net, EfficientNetLite0)
    return net


def _fine_tunable(net: EfficientNetLite0) -> EfficientNetLite0:
    """The pre-trained network with batch norms that follow a fine-tuning run within tens of steps.

    The weights came with momentum 0.01 (TensorFlow's decay 0.99), made for ImageNet's hundreds of
    thousands of steps: over a fine-tuning run of ~100 steps the running statistics lag the changing
    weights and the new data, and the evaluated network is not the one that trained. Full fine-tuning on
    1,000 packaged digits reached 0.77 accuracy with them and 0.93 once the statistics were recomputed
    on the training images; momentum 0.1 (torch's default) closes that gap. Frozen batch norms stay in
    eval mode (ImageClassifier.train) and never update, so this changes only the ones that train.
    """
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.momentum = SHORT_RUN_BN_MOMENTUM
    return net


def _random_lite0() -> EfficientNetLite0:
    """EfficientNet-Lite0 initialised as its authors did: convs He-normal (fan out), BN 1/0.

    Its batch norms average their statistics with torch's default momentum 0.1, not the 0.01 the
    pre-trained weights came with: a network trained from scratch changes fast, and statistics that
    lag ~100 steps behind it made the evaluated model predict one class (MNIST, 280 steps).
    """
    net = EfficientNetLite0()
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
            module.momentum = SHORT_RUN_BN_MOMENTUM
    return net


def _hf_backbone(cfg: ModelConfig) -> tuple[nn.Module, int]:
    from transformers import AutoConfig, AutoModel

    from tunesmith.models.load import load_error, resolve_source

    path = resolve_source(cfg, "image")
    try:
        if cfg.pretrained:
            backbone = AutoModel.from_pretrained(path, revision=cfg.revision, dtype=torch.float32)
        else:
            backbone = AutoModel.from_config(AutoConfig.from_pretrained(path, revision=cfg.revision))
    except (OSError, ValueError) as exc:
        raise ConfigError(load_error(cfg.name, exc, "a vision model", "image")) from None
    if getattr(backbone, "main_input_name", "pixel_values") != "pixel_values":
        raise ConfigError(
            f"model.name={cfg.name}: {type(backbone).__name__} takes {backbone.main_input_name}, not images; "
            "give a vision model (ViT, ResNet, ConvNeXt, ...) or efficientnet-lite0"
        )
    pooler = getattr(backbone, "pooler", None)
    if isinstance(pooler, nn.Module) and any(True for _ in pooler.parameters()):
        # A trained dense pooler (ViT) would feed the head a tanh layer that never trains with it;
        # the head reads the class token instead, as ViT's own image classifier does.
        backbone.pooler = None  # type: ignore[assignment]
    config = backbone.config
    sizes = getattr(config, "hidden_sizes", None)
    dim = int(sizes[-1] if sizes else getattr(config, "hidden_size", 0))
    if not dim:
        raise ConfigError(f"model.name={cfg.name}: cannot tell the feature width from its config")
    return backbone, dim


def _processor_config(cfg: ModelConfig) -> dict[str, Any]:
    """The model's `preprocessor_config.json` ({} when it has none: ViT-style defaults apply)."""
    from transformers.utils import cached_file

    from tunesmith.models.load import resolve_source

    try:
        found = cached_file(
            resolve_source(cfg, "image"),
            "preprocessor_config.json",
            revision=cfg.revision,
            _raise_exceptions_for_missing_entries=False,
        )
    except OSError:
        found = None
    if found is None:
        return {}
    with open(found, encoding="utf-8") as fh:
        return dict(json.load(fh))
