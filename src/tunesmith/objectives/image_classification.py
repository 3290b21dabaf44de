"""Image classification: cross-entropy over a new head; accuracy, top-k accuracy, macro-F1, confusion.

Items keep a reference to their image and decode it when their batch is built, so memory does
not grow with the data set. Training items may be augmented (`data.augment`); each image's random
choices come from a seed drawn from torch's global generator, which checkpoints save and restore,
so a resumed run augments exactly as an uninterrupted one.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.images import ImageExample, open_image
from tunesmith.data.transforms import Preprocessing, eval_transform, train_transform
from tunesmith.eval.metrics import ConfusionMetrics
from tunesmith.objectives.classification import ClassificationObjective

__all__ = ["ImageClassificationObjective"]

Item = dict[str, Any]


class ImageClassificationObjective:
    name = "image-classification"
    default_metric = "accuracy"

    def __init__(self, labels: Sequence[str], preprocessing: Preprocessing, augment: Any = None) -> None:
        self.labels = list(labels)
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.preprocessing = preprocessing
        self.augment = augment
        self.tokenizer = None  # part of the objective protocol; images need none

    @property
    def cacheable(self) -> bool:
        """Whether training inputs are fixed (no augmentation), so frozen work on them can be cached."""
        return self.augment is None

    def encode(
        self, examples: Sequence[ImageExample], split: str = "train", pack_rows: bool = False, chunk: int = 0
    ) -> list[Item]:
        """Items that point at their images (nothing is decoded here); training items are augmented
        when `data.augment` is set."""
        augment = split == "train" and self.augment is not None
        return [
            {
                "image": e.image,
                "where": e.where,
                "label": self.index[e.label] if e.label is not None else -1,
                "augment": augment,
            }
            for e in examples
        ]

    @staticmethod
    def length(item: Item) -> int:
        return 1  # every image becomes the same input size: nothing to group by length

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """Decode and transform a batch: pixel_values (B, 3, S, S) channels-last, labels (B,); or
        stack cached features (B, D) / feature maps (B, C, H, W)."""
        labels = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if "features" in items[0]:
            return {"features": torch.stack([it["features"] for it in items]), "labels": labels}
        if "hidden" in items[0]:
            hidden = torch.stack([it["hidden"] for it in items]).contiguous(memory_format=torch.channels_last)
            return {"hidden": hidden, "start_block": torch.tensor(items[0]["start_block"]), "labels": labels}
        pixels = torch.stack([self.pixels(it) for it in items])
        return {"pixel_values": pixels.contiguous(memory_format=torch.channels_last), "labels": labels}

    def pixels(self, item: Item) -> torch.Tensor:
        """One item's input (3, S, S): augmented for training items, deterministic otherwise."""
        image = open_image(item["image"], item.get("where", ""))
        if item.get("augment"):
            seed = int(torch.randint(0, 2**62, (1,)))  # from the global generator: checkpointed
            return train_transform(image, self.preprocessing, self.augment, random.Random(seed))
        return eval_transform(image, self.preprocessing)

    # Logits over labels, as for text: the same inputs split, cross-entropy and no samples to log.
    model_inputs = staticmethod(ClassificationObjective.model_inputs)
    loss = staticmethod(ClassificationObjective.loss)
    eval_samples = staticmethod(ClassificationObjective.eval_samples)

    def new_metrics(self) -> ConfusionMetrics:
        return ConfusionMetrics(self.labels, top_k=5)

    def cache_frozen(
        self,
        model: Any,
        items: Sequence[Item],
        k: int | None,
        batch_size: int,
        autocast: Any,
        max_bytes: int,
        spill_dir: Path,
        name: str,
    ) -> list[Item]:
        """Items with the frozen part's output in place of the image: pooled features when nothing
        before the head trains (`k` None), else the feature map entering stage `k`. Unchanged when the
        inputs are augmented (they differ every epoch) or the model cannot start at stage `k`."""
        from tunesmith.training.image_cache import cache_image_features, cache_image_states

        if not self.cacheable:
            return list(items)
        if k is None:
            return cache_image_features(model, items, self, batch_size, autocast, max_bytes, spill_dir, name)
        cached = cache_image_states(model, items, self, batch_size, autocast, max_bytes, spill_dir, name, k)
        return list(items) if cached is None else cached
