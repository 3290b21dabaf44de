"""report.html: one self-contained, well-formed HTML file built from what a run directory holds;
real runs (classification on the tiny BERT, sft on the tiny Llama), a hand-made unfinished run with
retention and a data report, and a run that has nothing but its config."""

from __future__ import annotations

import base64
import html
import json
import re
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

import tunesmith
from conftest import sentiment_rows, write_jsonl
from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError
from tunesmith.eval.report import write_report
from tunesmith.runs import open_run

ODD_LABEL = "<b>&"  # must come out escaped, never as markup
VOID = {"meta", "img", "br", "hr", "input", "link"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Document(HTMLParser):
    """Every element closed in order; the tags seen and the images' sources."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: Counter[str] = Counter()
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def read_document(path: Path) -> tuple[str, Document]:
    """The report's text, checked to be one offline HTML document whose images are real PNGs."""
    text = path.read_text(encoding="utf-8")
    doc = Document()
    doc.feed(text)
    doc.close()
    assert text.startswith("<!DOCTYPE html>")
    assert not doc.errors and not doc.stack, (doc.errors, doc.stack)
    assert doc.tags["html"] == doc.tags["head"] == doc.tags["body"] == 1
    assert doc.tags["script"] == doc.tags["link"] == 0
    assert not re.search(r"""(src|href)=(?!["']?data:)""", text)  # nothing fetched from outside
    for src in doc.images:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix) :], validate=True).startswith(PNG_MAGIC)
    return text, doc


def section(text: str, anchor: str) -> str:
    """The HTML of one section: from its <h2> to the next one."""
    start = text.index(f"<h2 id='{anchor}'>")
    end = text.find("<h2 ", start + 1)
    return text[start : end if end > 0 else None]


def anchors(text: str) -> set[str]:
    return set(re.findall(r"<h2 id='(\w+)'>", text))


def test_classification_report(base_config: dict, tmp_path: Path) -> None:
    rows = [{**r, "label": ODD_LABEL if r["label"] == "positive" else r["label"]} for r in sentiment_rows(64)]
    base_config["data"]["train"] = str(write_jsonl(tmp_path / "odd.jsonl", rows))
    run_dir = tunesmith.train(base_config, eval={"baseline": True}).run_dir
    evals = json.loads((run_dir / "eval.json").read_text())
    plan = json.loads((run_dir / "plan.json").read_text())

    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    assert not list(run_dir.glob(".report.html.*"))  # the atomic write left no temp file
    text, doc = read_document(path)
    assert len(doc.images) == 3  # loss (+ LR) curve, validation metrics, memory
    sections = {"settings", "training", "validation", "memory", "confusion", "final", "data", "plan", "manifest"}
    assert sections == anchors(text)
    assert "task classification · model" in text and "method lora" in text and ">finished<" in text
    assert html.escape(ODD_LABEL) in text and ODD_LABEL not in text

    confusion = evals["validation"]["confusion"]
    table = section(text, "confusion")
    heads = re.findall(r"<th>([^<]*)</th>", table)
    assert heads[1 : 1 + len(confusion["labels"])] == [html.escape(x) for x in confusion["labels"]]
    cells = [int(c) for c in re.findall(r"<td class='num cm'[^>]*>(\d+)</td>", table)]
    assert cells == [n for row in confusion["matrix"] for n in row]
    assert sum(cells) == evals["validation"]["count"] == plan["rows"]["validation"]

    final = section(text, "final")
    assert "<th>baseline</th><th>final</th><th>change</th>" in final
    for value in (evals["baseline"]["validation"]["accuracy"], evals["validation"]["accuracy"]):
        assert f">{value:.4g}<" in final
    assert f"{plan['trainable_parameters']:,} of {plan['total_parameters']:,}" in section(text, "plan")
    data_hash = next(iter(json.loads((run_dir / "manifest.json").read_text())["data"].values()))
    assert data_hash[:12] in section(text, "manifest")

    # Memory at every logged step and evaluation: resident now, and the peak so far (never falling).
    logged = [r for r in open_run(run_dir).metrics() if r["kind"] in ("train", "eval")]
    assert logged and all(r["rss_mb"] > 50 and r["peak_rss_mb"] >= r["rss_mb"] for r in logged)
    peaks = [r["peak_rss_mb"] for r in logged]
    assert peaks == sorted(peaks) and peaks[-1] <= evals["train"]["peak_rss_mb"] + 1

    # A bare list-of-lists matrix takes its label names from final/labels.json.
    evals["validation"]["confusion"] = confusion["matrix"]
    (run_dir / "eval.json").write_text(json.dumps(evals))
    text, _ = read_document(write_report(run_dir))
    heads = re.findall(r"<th>([^<]*)</th>", section(text, "confusion"))
    labels = json.loads((run_dir / "final" / "labels.json").read_text())
    assert heads[1 : 1 + len(labels)] == [html.escape(x) for x in labels]


def test_sft_report_shows_the_latest_samples(tiny_llama: Path, tmp_path: Path) -> None:
    words = ["red", "blue", "green", "gold"]
    rows = [{"prompt": f"colour of {words[i % 4]} {i}?", "completion": words[i % 4]} for i in range(24)]
    run_dir = tunesmith.train(
        model=str(tiny_llama),
        task="sft",
        method="lora",
        data={"train": str(write_jsonl(tmp_path / "qa.jsonl", rows)), "validation": 0.25, "max_length": 48},
        train={"epochs": 1, "batch_size": 8, "lr": 1e-2, "log_every": 1, "precision": "fp32"},
        eval={"max_new_tokens": 4, "samples": 2},
        output=str(tmp_path / "runs"),
    ).run_dir
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in logged if r["kind"] == "samples"][-1]

    text, doc = read_document(write_report(run_dir))
    assert len(doc.images) == 3  # loss, validation metrics, memory
    assert "confusion" not in anchors(text) and {"samples", "final", "plan"} <= anchors(text)
    shown = section(text, "samples")
    assert f"step {samples['step']}" in shown and shown.count("<tr>") == 1 + len(samples["samples"])
    for sample in samples["samples"]:
        assert f"<pre>{html.escape(sample['prompt'])}</pre>" in shown
        out = sample["output"]
        assert f"<pre>{html.escape(out if out.strip() else repr(out))}</pre>" in shown  # blank answers visible
    plan = section(text, "plan")
    assert "<td>template</td><td>chat</td>" in plan and "<th>kept</th>" in plan
    perplexity = json.loads((run_dir / "eval.json").read_text())["validation"]["perplexity"]
    assert f">{perplexity:.4g}<" in section(text, "final")


def test_unfinished_run_with_retention_and_data_report(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"task": "sft", "model": {"name": "m"}, "method": "x"}))
    (run_dir / "plan.json").write_text(json.dumps({"total_steps": 10}))
    records: list[dict[str, object]] = [
        {"kind": "train", "step": s, "epoch": s / 10, "loss": 3.0 - s / 4, "lr": 1e-3} for s in (1, 2, 3, 4)
    ]
    records += [{"kind": "eval", "step": 4, "epoch": 0.4, "metrics": {"loss": 2.0, "perplexity": 7.4, "tokens": 9}}]
    records += [
        {"kind": "retention", "step": s, "metric": "perplexity", "value": v, "baseline": 20.0, "change": v / 20 - 1}
        for s, v in ((2, 21.0), (4, 23.0))
    ]
    lines = [json.dumps(r) for r in records]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "train", "st')  # torn by a crash
    findings = [
        {"name": "empty", "count": 0, "share": 0.0, "limit": 0, "passed": True, "examples": []},
        {"name": "duplicates", "count": 3, "share": 0.3, "limit": 0.05, "passed": False, "examples": ["<script>x"]},
    ]
    report = {"rows": 10, "passed": False, "findings": findings, "label_counts": {}, "lengths": {"max": 40}}
    (run_dir / "data_report.json").write_text(json.dumps(report))

    text, doc = read_document(write_report(run_dir))
    assert "method x" in text and ">unfinished<" in text and "(step 4 of 10)" in text and "1 unreadable line" in text
    assert len(doc.images) == 3  # training, validation, retention
    assert {"training", "validation", "retention", "data", "plan"} <= anchors(text)
    assert not {"final", "confusion", "samples", "manifest"} & anchors(text)
    data = section(text, "data")
    rows = {m[0]: m[1] for m in re.findall(r"<tr><td>(\w+)</td>.*?class='(pass|fail)'", data)}
    assert rows == {"empty": "pass", "duplicates": "fail"}
    assert "&lt;script&gt;x" in data and "<script" not in text


def test_run_with_only_a_config(base_config: dict, tmp_path: Path) -> None:
    run_dir = tmp_path / "fresh"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_from_dict(base_config).to_dict()))
    (run_dir / "metrics.jsonl").write_text("")
    text, doc = read_document(write_report(run_dir))
    assert anchors(text) == {"settings"} and not doc.images
    assert "task classification" in text and "method lora" in text and ">unfinished<" in text
    with pytest.raises(ConfigError, match="no config.yaml"):
        write_report(tmp_path / "missing")
