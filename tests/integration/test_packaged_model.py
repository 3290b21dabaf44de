"""The real CLI on the packaged all-MiniLM-L6-v2 and Rotten Tomatoes reviews, a few steps each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_tunesmith

pytestmark = pytest.mark.slow

tunesmith = run_tunesmith


@pytest.mark.parametrize("method", ["lora", "feature-extraction"])
def test_train_predict_eval_on_the_packaged_model(tmp_path: Path, method: str) -> None:
    quick = [
        f"method.name={method}",
        "data.limit=96",
        "data.validation=0.02",
        "train.max_steps=3",
        "train.batch_size=16",
        "eval.baseline=false",
        f"output.dir={tmp_path}",
    ]
    done = tunesmith("train", "configs/classify-lora.yaml", *quick)
    assert done.returncode == 0, done.stderr
    (run_dir,) = tmp_path.iterdir()
    metrics = json.loads((run_dir / "eval.json").read_text())
    assert metrics["train"]["steps"] == 3
    assert metrics["validation"]["count"] > 200
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["base_model"]["sha256"] and "rotten-tomatoes" in manifest["data"]

    predicted = tunesmith("predict", run_dir, "A warm, funny and clever film.")
    assert predicted.returncode == 0, predicted.stderr
    assert predicted.stdout.split()[0] in ("positive", "negative")

    data = tmp_path / "few.jsonl"
    data.write_text(
        json.dumps({"text": "Dull and far too long.", "label": "negative"})
        + "\n"
        + json.dumps({"text": "A delight from start to finish.", "label": "positive"})
        + "\n"
    )
    evaluated = tunesmith("eval", run_dir, "--data", data, "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["count"] == 2


def test_bad_file_gives_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "reviews.jsonl"
    bad.write_text('{"text": "fine", "label": "positive"}\n{"text": "oops" "label": 1}\n')
    done = tunesmith("train", "configs/classify-lora.yaml", f"data.train={bad}", f"output.dir={tmp_path}")
    assert done.returncode == 2
    assert "reviews.jsonl:2" in done.stderr and "Traceback" not in done.stderr
