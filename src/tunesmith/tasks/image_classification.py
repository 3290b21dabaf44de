"""Image classification: an image -> one of a set of labels, through a new head on a pre-trained
vision backbone; cross-entropy; accuracy, top-k accuracy, macro-F1, confusion matrix.

Items keep a reference to their image and decode it when their batch is built, so memory does
not grow with the data set. Training items may be augmented (`data.augment`); each image's random
choices come from a seed drawn from torch's global generator, which checkpoints save and restore,
so a resumed run augments exactly as an uninterrupted one.

Its data gate opens and decodes every image once before training: images that cannot be read
(named with their path or row, skipped under `data.quality: warn`), exact duplicates by content
(the pixels or the file's bytes, whatever the file name), the same image under different labels,
validation/test images that also occur in training (leakage), and label balance. Near-duplicate
images (resized or re-encoded copies) are not detected: that needs a perceptual hash.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config import DataConfig
from tunesmith.data.images import ImageExample, content_key, open_image
from tunesmith.data.load import read_image_examples
from tunesmith.data.quality import Finding, QualityReport, limited
from tunesmith.data.transforms import Preprocessing, eval_transform, train_transform
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval.evaluate import predict_items
from tunesmith.eval.metrics import ConfusionMetrics
from tunesmith.models.image import build_image_classifier, image_preprocessing
from tunesmith.plugins import Method
from tunesmith.registry import register_task
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseObjective, BaseTask, label_rows
from tunesmith.training.image_cache import cache_image_features, cache_image_states

__all__ = ["ImageClassificationObjective", "ImageClassificationTask", "check_images"]

Item = dict[str, Any]
_SHOWN = 5


@register_task("image-classification")
class ImageClassificationTask(BaseTask):
    """Image -> label: a new head on a pre-trained vision backbone."""

    name = "image-classification"
    summary = "image -> label"
    headline = ("accuracy", "top5_accuracy")
    labelled = True
    output = "label"
    retention_metrics = ("accuracy",)

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[ImageExample]:
        return read_image_examples(source, data, require_labels=targets)

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        held = [e for r in references for e in read_image_examples(r, data)]
        return check_images(read_image_examples(source, data), held, data, source)

    def load_tokenizer(self, saved: Path | None = None) -> None:
        return None  # images need none

    def check_method(self, method: Method) -> None:
        if method.virtual_tokens:
            raise ConfigError(
                f"method.name={method.name} learns virtual tokens in front of a text input; image models take "
                "pixels, not tokens. Use feature-extraction, partial, lora or full"
            )

    def build_model(self, num_labels: int) -> nn.Module:
        model = build_image_classifier(self.cfg.model, num_labels, self.cfg.train.seed)
        model.input_size = image_preprocessing(self.cfg.model, self.cfg.data).size
        return model

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> ImageClassificationObjective:
        preprocessing = image_preprocessing(self.cfg.model, self.cfg.data)
        return ImageClassificationObjective(labels, preprocessing, self.cfg.data.augment)

    def predict(self, trained: Any, inputs: list[str] | None, data: str | None, runtime: Runtime) -> list[dict]:
        if data is not None:
            examples = read_image_examples(data, trained.config.data, require_labels=False)
        else:
            examples = [ImageExample(str(Path(p).expanduser()), None, p) for p in inputs or []]
        objective = trained.objective
        probs = predict_items(trained.model, objective, objective.encode(examples), runtime)
        return label_rows(examples, probs, objective.labels, lambda e: {"image": e.where})


class ImageClassificationObjective(BaseObjective):
    default_metric = "accuracy"

    def __init__(self, labels: Sequence[str], preprocessing: Preprocessing, augment: Any = None) -> None:
        super().__init__(None, labels)  # images need no tokenizer
        self.index = {label: i for i, label in enumerate(self.labels)}
        self.preprocessing = preprocessing
        self.augment = augment

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

    @staticmethod
    def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(logits.float(), batch["labels"])

    def new_metrics(self) -> ConfusionMetrics:
        return ConfusionMetrics(self.labels, top_k=5)

    def cache_frozen(
        self,
        model: Any,
        items: Sequence[Item],
        k: int | None,
        runtime: Runtime,
        max_bytes: int,
        spill_dir: Path,
        name: str,
    ) -> list[Item]:
        """Items with the frozen part's output in place of the image: pooled features when nothing
        before the head trains (`k` None), else the feature map entering stage `k`. Unchanged when the
        inputs are augmented (they differ every epoch) or the model cannot start at stage `k`."""
        if not self.cacheable:
            return list(items)
        size, autocast = runtime.eval_batch_size, runtime.autocast
        if k is None:
            return cache_image_features(model, items, self, size, autocast, max_bytes, spill_dir, name)
        cached = cache_image_states(model, items, self, size, autocast, max_bytes, spill_dir, name, k)
        return list(items) if cached is None else cached


# --- the data gate ---------------------------------------------------------------------------


def check_images(
    train: Sequence[ImageExample], held_out: Sequence[ImageExample], cfg: DataConfig, source: str
) -> QualityReport:
    """The report on training images (and held-out ones, for readability and leakage).

    Its `unreadable` lists the origin of every image that failed to open, train and held-out alike.
    """
    t = cfg.thresholds
    unreadable: list[str] = []
    problems: list[str] = []
    train_keys = _keys(train, unreadable, problems)
    held_keys = _keys(held_out, unreadable, problems)
    copies = Counter(k for k in train_keys if k is not None)
    duplicates = [ex.where for ex, k in _firsts_skipped(train, train_keys)]
    labels_of: dict[str, set[str]] = {}
    for ex, key in zip(train, train_keys, strict=True):
        if key is not None and ex.label is not None:
            labels_of.setdefault(key, set()).add(ex.label)
    conflicting = [key for key, labels in labels_of.items() if len(labels) > 1]
    where_of = {key: ex.where for ex, key in zip(train, train_keys, strict=True) if key is not None}
    leaked = [ex.where for ex, key in zip(held_out, held_keys, strict=True) if key is not None and key in copies]
    total = len(train) + len(held_out)
    held_note = "held-out images equal to a training image" if held_out else "no validation/test file given"
    findings = (
        limited(
            "unreadable",
            problems,
            total,
            t,
            "replace or remove these images; under data.quality: warn they are skipped",
            "each image opened and fully decoded",
        ),
        limited(
            "duplicates",
            duplicates,
            len(train),
            t,
            "remove the extra copies (the first is kept)",
            "the same pixels (or file bytes) under any name",
        ),
        limited(
            "conflicting",
            [f"{where_of[k]}: {sorted(labels_of[k])}" for k in conflicting],
            len(train),
            t,
            "give each image one label, or remove it",
        ),
        limited(
            "leakage",
            leaked,
            len(held_out),
            t,
            "remove these images from validation/test (or from training)",
            held_note,
            checked=bool(held_out),
        ),
        _label_balance(train, cfg),
    )
    return QualityReport(source, "image-classification", total, findings, "words", unreadable=tuple(unreadable))


def _keys(examples: Sequence[ImageExample], unreadable: list[str], problems: list[str]) -> list[str | None]:
    """Each example's content key after decoding it once (None where it cannot be read)."""
    keys: list[str | None] = []
    for ex in examples:
        try:
            data = ex.image if not isinstance(ex.image, str) else _read_bytes(ex.image, ex.where)
            open_image(data if isinstance(data, bytes) else ex.image, ex.where)
            keys.append(content_key(data))
        except DataError as exc:
            unreadable.append(ex.where)
            problems.append(str(exc))
            keys.append(None)
    return keys


def _read_bytes(path: str, where: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise DataError(f"{where}: cannot read the image file ({exc.strerror or exc})") from None


def _firsts_skipped(examples: Sequence[ImageExample], keys: Sequence[str | None]) -> Iterator[tuple[ImageExample, str]]:
    seen: set[str] = set()
    for ex, key in zip(examples, keys, strict=True):
        if key is None:
            continue
        if key in seen:
            yield ex, key
        seen.add(key)


def _label_balance(train: Sequence[ImageExample], cfg: DataConfig) -> Finding:
    counts = Counter(ex.label for ex in train if ex.label is not None)
    ordered = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    rarest = min(ordered, key=lambda label: (ordered[label], label)) if ordered else ""
    return Finding(
        "label_balance",
        ordered.get(rarest, 0),
        sum(ordered.values()),
        cfg.thresholds.min_class_share,
        "min_share",
        setting="data.thresholds.min_class_share",
        fix="add images of the rarest label, or lower data.thresholds.min_class_share",
        examples=tuple(f"{label}: {count}" for label, count in list(ordered.items())[:_SHOWN]),
        detail=f"rarest label {rarest!r}; count and share are its images" if ordered else "no labelled images",
        stats={"labels": ordered, "rarest": rarest},
    )
