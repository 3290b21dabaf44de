"""Image data: every reader, lazy examples, content keys, transforms, preprocessing, the image gate."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tunesmith.config import AugmentConfig, DataConfig, ModelConfig
from tunesmith.data.images import ImageExample, content_key, open_image
from tunesmith.data.load import load_splits, read_image_examples
from tunesmith.data.transforms import (
    Preprocessing,
    eval_transform,
    random_resized_crop,
    to_tensor,
    train_transform,
)
from tunesmith.errors import DataError
from tunesmith.models.image import image_preprocessing
from tunesmith.tasks.image_classification import check_images

PRE = Preprocessing(size=8, resize=10, mean=(127.0,) * 3, std=(128.0,) * 3)


def digit(value: int, size: int = 12) -> np.ndarray:
    """A grayscale uint8 image whose pixels encode `value` (distinct images for distinct values)."""
    rng = np.random.default_rng(value)
    return rng.integers(0, 256, (size, size), dtype=np.uint8)


def png_bytes(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def write_folder(root: Path, per_class: int = 3) -> Path:
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / label / f"{i}.png").write_bytes(png_bytes(digit(i + (100 if label == "dog" else 0))))
    return root


def test_image_folder_reads_classes_from_folder_names(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "photos")
    (root / "notes.txt").write_text("not an image")
    examples = read_image_examples(str(root), DataConfig(train=str(root)))
    assert [e.label for e in examples] == ["cat"] * 3 + ["dog"] * 3
    assert all(isinstance(e.image, str) and e.image.endswith(".png") for e in examples)  # lazy: paths only
    assert examples[0].where.endswith("cat/0.png")


def test_empty_folder_says_how_it_should_look(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="one sub-folder per class"):
        read_image_examples(str(tmp_path / "empty"), DataConfig(train="x"))


def test_csv_and_jsonl_paths_resolve_against_the_table(tmp_path: Path) -> None:
    write_folder(tmp_path / "img")
    (tmp_path / "train.csv").write_text("file,kind\nimg/cat/0.png,cat\nimg/dog/1.png,dog\n")
    cfg = DataConfig(train="x", column_map={"file": "image", "kind": "label"})
    examples = read_image_examples(str(tmp_path / "train.csv"), cfg)
    assert [Path(str(e.image)) for e in examples] == [tmp_path / "img/cat/0.png", tmp_path / "img/dog/1.png"]
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "img/cat/2.png", "label": 3}) + "\n")
    (example,) = read_image_examples(str(tmp_path / "rows.jsonl"), DataConfig(train="x"))
    assert example.label == "3" and Path(str(example.image)) == tmp_path / "img/cat/2.png"


def test_parquet_with_datasets_style_image_column(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    encoded = png_bytes(digit(1))
    table = pa.table({"img": [{"bytes": encoded, "path": "a.png"}], "y": ["one"]})
    pq.write_table(table, tmp_path / "d.parquet")
    cfg = DataConfig(train="x", image_field="img", label_field="y")
    (example,) = read_image_examples(str(tmp_path / "d.parquet"), cfg)
    assert example.image == encoded and example.label == "one"
    assert np.array_equal(np.asarray(open_image(example.image)), digit(1))


def test_saved_datasets_directory(tmp_path: Path) -> None:
    import pyarrow as pa

    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "dataset_info.json").write_text("{}")
    table = pa.table({"image": [{"bytes": png_bytes(digit(i)), "path": None} for i in range(2)], "label": [0, 1]})
    with pa.OSFile(str(saved / "data-00000-of-00001.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    examples = read_image_examples(str(saved), DataConfig(train="x"))
    assert [e.label for e in examples] == ["0", "1"]
    assert examples[1].where == "data-00000-of-00001.arrow row 1"


def test_npz_arrays(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", images=np.stack([digit(0), digit(1)]), labels=np.array([4, 7]))
    examples = read_image_examples(str(tmp_path / "a.npz"), DataConfig(train="x"))
    assert [e.label for e in examples] == ["4", "7"] and np.array_equal(examples[1].image, digit(1))
    np.savez(tmp_path / "bad.npz", pixels=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(DataError, match="no array named images, labels"):
        read_image_examples(str(tmp_path / "bad.npz"), DataConfig(train="x"))


def test_rows_without_an_image_are_all_listed(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_text('{"image": "", "label": "a"}\n{"picture": "x.png", "label": "b"}\n')
    with pytest.raises(DataError) as info:
        read_image_examples(str(tmp_path / "t.jsonl"), DataConfig(train="x"))
    assert "t.jsonl:1" in str(info.value) and "t.jsonl:2" in str(info.value) and "data.image_field" in str(info.value)


def test_packaged_mnist() -> None:
    examples = read_image_examples("mnist-5k", DataConfig(train="mnist-5k"))
    assert len(examples) == 5000 and {e.label for e in examples} == {str(d) for d in range(10)}
    assert examples[0].image.shape == (28, 28) and examples[0].where == "mnist-5k:1"


def test_content_key_sees_pixels_not_names(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "p")
    copy = tmp_path / "copy.png"
    copy.write_bytes((root / "cat" / "0.png").read_bytes())
    assert content_key(str(copy)) == content_key(str(root / "cat" / "0.png"))
    assert content_key(str(copy)) == content_key((root / "cat" / "0.png").read_bytes())
    assert content_key(digit(1)) != content_key(digit(2))
    assert content_key(digit(1)) != content_key(digit(1).reshape(6, 24))  # same bytes, other shape


def test_copies_of_an_image_stay_on_one_side_of_the_split(tmp_path: Path) -> None:
    images = np.stack([digit(i % 10) for i in range(40)])  # every image 4 times
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([i % 10 % 2 for i in range(40)]))
    cfg = DataConfig(train=str(tmp_path / "d.npz"), validation=0.25)
    splits = load_splits(cfg, seed=0, read=lambda source: read_image_examples(source, cfg), labelled=True)
    train_keys = {content_key(e.image) for e in splits.train}
    assert splits.validation and not any(content_key(e.image) in train_keys for e in splits.validation)


def test_eval_transform_is_deterministic_and_normalised() -> None:
    image = Image.fromarray(np.full((20, 30), 255, np.uint8))  # grayscale, not square
    a, b = eval_transform(image, PRE), eval_transform(image, PRE)
    assert a.shape == (3, 8, 8) and torch.equal(a, b)
    assert torch.allclose(a, torch.full_like(a, (255 - 127) / 128))  # grayscale -> 3 equal channels


def test_squash_resize_without_crop() -> None:
    pre = Preprocessing(size=4, resize=None, mean=(0.0,) * 3, std=(1.0,) * 3)
    assert eval_transform(Image.fromarray(np.zeros((2, 9, 3), np.uint8)), pre).shape == (3, 4, 4)


def test_train_transform_is_seeded() -> None:
    image = Image.fromarray(digit(3, size=32)).convert("RGB")
    augment = AugmentConfig(crop_scale=(0.2, 0.6), hflip=True)
    first = train_transform(image, PRE, augment, random.Random(7))
    assert torch.equal(first, train_transform(image, PRE, augment, random.Random(7)))
    others = [train_transform(image, PRE, augment, random.Random(seed)) for seed in range(5)]
    assert sum(torch.equal(first, o) for o in others) <= 1
    assert not torch.equal(first, eval_transform(image, PRE))


def test_random_resized_crop_covers_the_requested_area() -> None:
    image = Image.fromarray(np.arange(100 * 100, dtype=np.uint32).reshape(100, 100).astype(np.uint8))
    crop = random_resized_crop(image, 10, (1.0, 1.0), (1.0, 1.0), random.Random(0))
    assert crop.size == (10, 10)
    assert np.array_equal(np.asarray(crop), np.asarray(image.resize((10, 10), Image.Resampling.BILINEAR)))


def test_to_tensor_uses_per_channel_statistics() -> None:
    pre = Preprocessing(size=1, resize=None, mean=(10.0, 20.0, 30.0), std=(1.0, 2.0, 5.0))
    out = to_tensor(Image.fromarray(np.array([[[40, 40, 40]]], np.uint8)), pre)
    assert out.flatten().tolist() == [30.0, 10.0, 2.0]


def test_preprocessing_follows_the_models_processor(tmp_path: Path) -> None:
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "preprocessor_config.json").write_text(
        json.dumps({"size": {"height": 32, "width": 32}, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    )
    pre = image_preprocessing(ModelConfig(name=str(vit)), DataConfig(train="x"))
    assert (pre.size, pre.resize) == (32, None) and pre.mean == (127.5,) * 3 and pre.std == (127.5,) * 3
    convnext = tmp_path / "convnext"
    convnext.mkdir()
    (convnext / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "image_mean": [0.485, 0.456, 0.406]})
    )
    pre = image_preprocessing(ModelConfig(name=str(convnext)), DataConfig(train="x", image_size=112))
    assert (pre.size, pre.resize) == (112, 128) and pre.mean[0] == pytest.approx(0.485 * 255)
    lite0 = image_preprocessing(ModelConfig(name="efficientnet-lite0"), DataConfig(train="x", image_size=64))
    assert (lite0.size, lite0.resize, lite0.mean, lite0.std) == (64, 73, (127.0,) * 3, (128.0,) * 3)


def test_image_gate_finds_unreadable_duplicates_conflicts_and_leakage(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "p", per_class=4)
    (root / "cat" / "broken.png").write_bytes(png_bytes(digit(50))[:40])  # truncated
    (root / "dog" / "0-again.png").write_bytes((root / "dog" / "0.png").read_bytes())  # duplicate
    (root / "dog" / "cat-copy.png").write_bytes((root / "cat" / "1.png").read_bytes())  # conflicting label
    held = [ImageExample(str(root / "cat" / "2.png"), "cat", "val:1"), ImageExample(digit(99), "dog", "val:2")]
    cfg = DataConfig(train=str(root))
    report = check_images(read_image_examples(str(root), cfg), held, cfg, str(root))
    counts = {f.name: f.count for f in report.findings}
    assert counts["unreadable"] == 1 and report.unreadable == (str(root / "cat" / "broken.png"),)
    assert "cannot read the image" in report.finding("unreadable").examples[0]
    assert counts["duplicates"] == 2 and counts["conflicting"] == 1 and counts["leakage"] == 1
    assert not report.passed and {f.name for f in report.failed} == {
        "unreadable",
        "duplicates",
        "conflicting",
        "leakage",
    }
    assert report.to_dict()["unreadable"] == [str(root / "cat" / "broken.png")]
