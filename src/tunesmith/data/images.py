"""Image classification records: where images come from, and how one is opened when it is needed.

An `ImageExample` holds a *reference* to its image (a file path, encoded bytes or a pixel array),
never decoded pixels: a folder of a million images costs a few hundred bytes a row until a batch
asks for its images (`open_image`). Sources:

- an image folder, `root/<class>/<image>` (the class is the folder name);
- a JSONL/JSON/CSV/TSV/Parquet table with an image column (a path relative to the table's folder,
  or `{bytes, path}` as Hugging Face `datasets` stores images) and a label column;
- a saved `datasets` directory (its Arrow files, read with pyarrow);
- arrays: an `.npz` file with `images` (N, H, W) or (N, H, W, C) uint8 and `labels`, or the
  packaged `mnist-5k` (5,000 28x28 digits).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.data.media import datasets_rows, folder_rows, is_datasets_dir, renamed_rows
from tunesmith.data.readers import Row, read_rows
from tunesmith.data.records import summarize_problems
from tunesmith.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageExample",
    "ImageRef",
    "content_key",
    "image_rows",
    "open_image",
    "read_image_table",
    "to_image_examples",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

# A path (str), encoded file bytes, or a uint8 pixel array (H, W) / (H, W, C).
ImageRef = str | bytes | np.ndarray


@dataclass(frozen=True, eq=False)
class ImageExample:
    """One image classification example.

    Attributes:
        image: where the pixels are (see `ImageRef`); decoded only by `open_image`.
        label: the class as a string; None for unlabelled input (prediction).
        where: the row's origin (`data.csv:12`, `root/cat/1.png`, `mnist-5k:7`).
    """

    image: ImageRef
    label: str | None
    where: str = ""

    def key(self) -> str:
        """What splits and samples hash: the pixels (or file bytes), not the name, so copies move together."""
        return content_key(self.image)


def image_rows(source: str, column_map: dict[str, str] | None = None) -> list[Row] | None:
    """Rows of an image-only source (a folder, a saved `datasets` directory, an `.npz` file), or
    None when `source` is a table file for the ordinary readers."""
    path = Path(source)
    if is_datasets_dir(path):
        return renamed_rows(datasets_rows(path), column_map)
    if path.is_dir():
        return folder_rows(path, IMAGE_SUFFIXES, "image", "images")
    if path.suffix.lower() == ".npz" and path.is_file():
        return _npz_rows(path)
    return None


def to_image_examples(
    rows: Sequence[Row],
    image_field: str,
    label_field: str | None,
    base: Path | None = None,
    label_map: dict[str, str] | None = None,
    require_labels: bool = True,
) -> list[ImageExample]:
    """Examples from rows, every row checked first (one `DataError` lists all bad rows).

    Paths are taken relative to `base` (the folder of the table that names them). The images are
    not opened here: unreadable ones are found by the quality gate or when a batch decodes them.
    """
    from tunesmith.data.records import _label_text, _RowError  # one label rule for text and images

    label_map = label_map or {}
    examples: list[ImageExample] = []
    problems: list[str] = []
    for row in rows:
        image = row.data.get(image_field)
        ref = _ref(image, base)
        if ref is None:
            present = ", ".join(row.data) or "none"
            problems.append(
                f"{row.where}: field {image_field!r} is missing or holds no image ({type(image).__name__}; fields "
                f"present: {present}); give a path, bytes or {{bytes, path}}, or set data.image_field"
            )
            continue
        label = row.data.get(label_field) if label_field is not None else None
        if label is None or (isinstance(label, str) and not label.strip()):
            if require_labels:
                problems.append(f"{row.where}: no label in field {label_field!r}; give one or set data.label_field")
                continue
            examples.append(ImageExample(ref, None, row.where))
            continue
        try:
            text = _label_text(label, str(label_field))
        except _RowError as exc:  # the label is neither a string nor a whole number
            problems.append(f"{row.where}: {exc}")
            continue
        examples.append(ImageExample(ref, label_map.get(text, text), row.where))
    if problems:
        raise DataError(summarize_problems(problems, "problem(s) in the image data; fix them all, then run again"))
    return examples


def open_image(ref: ImageRef, where: str = "") -> Any:
    """The image as a decoded RGB or grayscale PIL image.

    Raises:
        DataError: naming `where` (or the path) when the file is missing, truncated or not an image.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(ref, np.ndarray):
        return _from_array(ref, where)
    try:
        image: Any = Image.open(ref if isinstance(ref, str) else io.BytesIO(ref))
        image.load()  # decode now, so a truncated file fails here and not halfway through a batch
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        name = where or (ref if isinstance(ref, str) else "image bytes")
        raise DataError(f"{name}: cannot read the image ({exc}); replace or remove it") from None
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    return image


def content_key(ref: ImageRef) -> str:
    """A hash of the image's content: the file's bytes, or the array's shape and pixels. Equal
    images under different names get the same key (duplicates, leakage, the feature cache)."""
    digest = hashlib.sha256()
    if isinstance(ref, np.ndarray):
        digest.update(repr((ref.shape, str(ref.dtype))).encode())
        digest.update(np.ascontiguousarray(ref).tobytes())
    elif isinstance(ref, bytes):
        digest.update(ref)
    else:
        try:
            digest.update(Path(ref).read_bytes())
        except OSError as exc:
            raise DataError(f"{ref}: cannot read the image file ({exc})") from None
    return digest.hexdigest()


def _from_array(array: np.ndarray, where: str) -> Any:
    from PIL import Image

    ok_shape = array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))
    if array.dtype != np.uint8 or not ok_shape:
        raise DataError(
            f"{where}: an image array must be uint8 (H, W) or (H, W, 1|3|4), got {array.dtype} {array.shape}"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    image = Image.fromarray(array)
    return image.convert("RGB") if image.mode == "RGBA" else image


def _ref(value: Any, base: Path | None) -> ImageRef | None:
    if isinstance(value, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        if value.get("bytes"):
            return bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, bytes | bytearray) and value:
        return bytes(value)
    if isinstance(value, np.ndarray):
        return value
    if isinstance(value, str) and value.strip():
        path = Path(value.strip()).expanduser()
        return str(path if path.is_absolute() or base is None else base / path)
    return None


def _npz_rows(path: Path) -> list[Row]:
    with np.load(path, allow_pickle=False) as data:
        missing = [key for key in ("images", "labels") if key not in data]
        if missing:
            raise DataError(f"{path}: no array named {', '.join(missing)}; save images=(N, H, W[, C]) and labels=(N,)")
        images, labels = data["images"], data["labels"]
    if len(images) != len(labels):
        raise DataError(f"{path}: {len(images)} images but {len(labels)} labels; give one label per image")
    return [Row({"image": images[i], "label": labels[i].item()}, f"{path}[{i}]") for i in range(len(images))]


def read_image_table(source: str, column_map: dict[str, str] | None) -> list[Row]:
    """Rows of any image source: folders, datasets directories and arrays, else a table file."""
    rows = image_rows(source, column_map)
    return rows if rows is not None else read_rows(source, column_map)
