"""Adding a task is its own code plus one registration: a task defined in this file, registered
in-process, gets its config section, trains, evaluates, predicts, shows its headline metrics in
`runs ls` and `compare`, and refuses a method that does not fit it, through the same config, loop,
run directory and API as the built-in tasks. No file of tunesmith changes for it."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field
from torch import nn

import tunesmith
from conftest import FILLER, run_cli, write_jsonl
from tunesmith import registry
from tunesmith.config import DataConfig, Section
from tunesmith.data.load import read_source_rows
from tunesmith.data.quality import QualityReport, limited
from tunesmith.data.records import Example
from tunesmith.errors import ConfigError, DataError
from tunesmith.eval.evaluate import predict_items
from tunesmith.models.load import build_classifier
from tunesmith.plugins import Method
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseTask, label_rows
from tunesmith.tasks.classification import ClassificationObjective


class TextLengthConfig(Section):
    """Where a text stops being short."""

    words: int = Field(4, gt=0, description="Texts with more words than this are long.")


class TextLengthTask(BaseTask):
    """Text -> short or long, from rows that carry only a text: the labels come from the task."""

    name = "text-length"
    summary = "text -> short or long"
    section = TextLengthConfig
    headline = ("accuracy",)
    labelled = True
    output = "label"
    retention_metrics = ("accuracy",)

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[Example]:
        words = self.cfg.section(self.name).words
        examples = []
        for row in read_source_rows(source, data):
            text = row.data.get(data.text_field)
            if not isinstance(text, str) or not text.strip():
                raise DataError(f"{row.where}: no text in field {data.text_field!r}")
            examples.append(Example(text, "long" if len(text.split()) > words else "short", where=row.where))
        return examples

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        examples = self.read_examples(source, data)
        seen: set[str] = set()
        copies = [e.where for e in examples if e.text in seen or seen.add(e.text)]  # type: ignore[func-returns-value]
        findings = (limited("duplicates", copies, len(examples), data.thresholds, "remove the copies"),)
        return QualityReport(source, self.name, len(examples), findings, "words")

    def check_method(self, method: Method) -> None:
        if method.virtual_tokens:
            raise ConfigError(f"method.name={method.name}: text-length reads the text itself; use another method")

    def build_model(self, num_labels: int) -> nn.Module:
        return build_classifier(self.cfg.model, num_labels, self.cfg.train.seed)

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> ClassificationObjective:
        return ClassificationObjective(tokenizer, labels, self.cfg.data.max_length)

    def predict(self, trained: Any, inputs: list[str] | None, data: str | None, runtime: Runtime) -> list[dict]:
        examples = [Example(t, None) for t in inputs or []]
        objective = trained.objective
        probs = predict_items(trained.model, objective, objective.encode(examples), runtime)
        return label_rows(examples, probs, objective.labels, lambda e: {"text": e.text})


@pytest.fixture()
def text_length() -> Iterator[None]:
    registry.register_task("text-length")(TextLengthTask)  # the one registration line
    yield
    registry.unregister_task("text-length")


@pytest.fixture()
def texts(tmp_path: Path) -> Path:
    rng = random.Random(0)
    lengths = [rng.choice((1, 2)) if i % 2 else rng.choice((8, 9, 10)) for i in range(64)]
    rows = [{"text": " ".join(rng.choices(FILLER, k=n))} for n in lengths]
    return write_jsonl(tmp_path / "texts.jsonl", rows)


def test_a_task_registered_here_runs_end_to_end(
    text_length: None, tiny_bert: Path, texts: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    config = {
        "model": str(tiny_bert),
        "task": "text-length",
        "text-length": {"words": 4},
        "method": "full",
        "data": {"train": str(texts), "validation": 0.25, "max_length": 16},
        "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "precision": "fp32"},
        "output": str(tmp_path / "runs"),
    }
    result = tunesmith.train(config)
    assert result.metrics["validation"]["accuracy"] >= 0.75  # the length of a text is easy to see
    saved = json.loads(json.dumps(tunesmith.load_config(result.run_dir / "config.yaml").to_dict()))
    assert saved["text-length"] == {"words": 4}  # its section, saved with the run under its own key
    assert json.loads((result.run_dir / "plan.json").read_text())["labels"] == ["long", "short"]
    assert json.loads((result.run_dir / "data_report.json").read_text())["task"] == "text-length"

    (row,) = tunesmith.predict(result.run_dir, [" ".join(FILLER)])
    assert row["text"] == " ".join(FILLER) and set(row["scores"]) == {"long", "short"}
    assert tunesmith.evaluate(result.run_dir, texts)["count"] == 64
    refused = "score is for runs that give a score; this text-length run gives a label: use tunesmith predict"
    with pytest.raises(ConfigError, match=refused):
        tunesmith.score(result.run_dir, ["p"], ["r"])

    listed = run_cli(monkeypatch, capsys, "runs", "ls", tmp_path / "runs")
    assert "text-length" in listed.text and f"accuracy {result.metrics['validation']['accuracy']:.4f}" in listed.text
    from tunesmith.compare import headline

    assert headline("text-length") == ("accuracy",)


def test_its_section_and_method_refusal_work_like_a_built_in_tasks(
    text_length: None, tiny_bert: Path, texts: Path, tmp_path: Path
) -> None:
    base = {"model": str(tiny_bert), "task": "text-length", "data": {"train": str(texts)}}
    with pytest.raises(ConfigError, match="text-length.word: unknown key; did you mean 'words'"):
        tunesmith.load_config({**base, "text-length": {"word": 3}})
    with pytest.raises(ConfigError, match="text-length reads the text itself"):
        tunesmith.train({**base, "method": "prompt-tuning", "output": str(tmp_path)})


def test_an_unregistered_task_is_an_unknown_task(tiny_bert: Path, texts: Path) -> None:
    with pytest.raises(ConfigError, match="task: must be 'classification'.*got 'text-length'"):
        tunesmith.load_config({"model": str(tiny_bert), "task": "text-length", "data": {"train": str(texts)}})
