"""The run report (DESIGN §9): one self-contained `report.html` built only from a run directory.

Loss and learning-rate curves, validation metrics, the confusion matrix, retention against its
baseline, generated samples, final metrics, the data report, plan and manifest. Plots are PNGs
embedded as base64 (matplotlib's Agg canvas, no pyplot state), so the file reads offline with no
server; every piece of text from the run is escaped. A missing file just omits its sections.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.eval.html import (
    clip,
    esc,
    figure,
    fmt,
    h2,
    is_number,
    mark,
    page,
    pick,
    png,
    pre,
    scalars,
    section,
    series_png,
    table,
)
from tunesmith.runs import atomic_write_text, open_run

__all__ = ["RunFiles", "read_run_files", "write_report"]

SPLITS = ("validation", "test")
SIZE_METRICS = ("count", "tokens", "answered")  # sizes, not quality: tabulated, never plotted


@dataclass(frozen=True)
class RunFiles:
    """What a run directory holds; a file it lacks is None (records: empty)."""

    dir: Path
    config: dict[str, Any]
    config_text: str
    records: list[dict[str, Any]]  # metrics.jsonl
    unreadable_lines: int  # e.g. the torn last line of a crashed run
    plan: dict[str, Any] | None
    manifest: dict[str, Any] | None
    evals: dict[str, Any] | None  # eval.json
    data_report: dict[str, Any] | None
    labels: list[str] | None  # final/labels.json

    def kind(self, kind: str) -> list[dict[str, Any]]:
        """The records of one kind, in log order (every record the loop logs has a step)."""
        return [r for r in self.records if r.get("kind") == kind and is_number(r.get("step"))]


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` (atomically) from the files the run directory holds.

    Works on unfinished runs too: sections whose files or records are missing are left out.

    Raises:
        ConfigError: `run_dir` has no config.yaml, or one of its JSON files cannot be read.
    """
    files = read_run_files(Path(run_dir))
    sections = (_header, _settings, _lr_finder, _training, _validation, _memory, _confusion, _retention, _samples)
    body = "".join(section(files) for section in (*sections, _final_metrics, _data_report, _plan, _manifest))
    path = files.dir / "report.html"
    atomic_write_text(path, page(f"tunesmith run {files.dir.name}", body))
    return path


def read_run_files(run_dir: str | Path) -> RunFiles:
    """Read every file the report uses; missing optional files are None."""
    run = open_run(run_dir)
    config = run.config()
    records, unreadable = _read_records(run.dir / "metrics.jsonl")
    labels = _read_optional(run.final / "labels.json")
    return RunFiles(
        dir=run.dir,
        config=config if isinstance(config, dict) else {},
        config_text=(run.dir / "config.yaml").read_text(encoding="utf-8"),
        records=records,
        unreadable_lines=unreadable,
        plan=_read_optional(run.dir / "plan.json"),
        manifest=_read_optional(run.dir / "manifest.json"),
        evals=_read_optional(run.dir / "eval.json"),
        data_report=_read_optional(run.dir / "data_report.json"),
        labels=[str(x) for x in labels] if isinstance(labels, list) else None,
    )


def _read_optional(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc}); delete or restore the file to build the report") from exc


def _read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """metrics.jsonl records, and how many lines could not be read (the report says so)."""
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in filter(str.strip, path.read_text(encoding="utf-8").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def _header(files: RunFiles) -> str:
    """Run name, task, model, method and status (each section returns "" when it has nothing)."""
    what = {k: files.config.get(k, "?") for k in ("task", "model", "method")}  # model, method: {name, ...}
    meta = " · ".join(f"{k} {esc(v.get('name', '?') if isinstance(v, dict) else v)}" for k, v in what.items())
    note = f"<p class='fail'>{files.unreadable_lines} unreadable line(s) of metrics.jsonl skipped</p>"
    return f"<h1>{esc(files.dir.name)}</h1><p class='meta'>{meta} · {_status(files)}</p>" + (
        note if files.unreadable_lines else ""
    )


def _status(files: RunFiles) -> str:
    stops = files.kind("early_stop")
    if files.evals is not None:
        early = f", stopped early at step {esc(stops[-1].get('step'))}" if stops else ""
        return f"<strong class='pass'>finished</strong>{early}"
    steps = [r["step"] for r in files.kind("train")]
    total = (files.plan or {}).get("total_steps")
    where = f" (step {max(steps)}{f' of {esc(total)}' if total else ''})" if steps else ""
    return f"<strong class='fail'>unfinished</strong>{where}"


def _settings(files: RunFiles) -> str:
    cfg = files.config
    method, train, data, evals = (section(cfg, k) for k in ("method", "train", "data", "eval"))
    rows = {f"method.{k}": v for k, v in method.items() if k != "name" and v is not None}
    rows |= pick(train, "epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "warmup_ratio")
    rows |= pick(train, "weight_decay", "precision", "seed", "early_stopping")
    rows |= {f"data.{k}": v for k, v in pick(data, "train", "validation", "test", "max_length", "template").items()}
    rows |= {f"eval.{k}": v for k, v in pick(evals, "metric", "baseline", "retention").items()}
    full = f"<details><summary>config.yaml</summary><pre>{esc(files.config_text)}</pre></details>"
    return h2("settings", "Settings") + table(None, rows.items()) + full


def _lr_finder(files: RunFiles) -> str:
    """The learning-rate range test of `train.lr: auto`: loss against rate, and the rate it chose."""
    finder = (files.plan or {}).get("lr_finder")
    if not isinstance(finder, dict):
        return ""
    lrs = finder.get("lrs") or []
    points = [(x, y) for x, y in zip(lrs, finder.get("losses") or [], strict=False) if is_number(y)]
    raw = [(x, y) for x, y in zip(lrs, finder.get("raw_losses") or [], strict=False) if is_number(y)]
    facts = {k: finder.get(k) for k in ("chosen", "rule", "steepest", "stop", "seconds")}
    facts["steps"] = len(points)
    if not points:
        return h2("lr_finder", "Learning-rate range test") + table(None, facts.items())
    fig = figure(7.5, 3.2)
    ax = fig.add_subplot()
    if raw:
        ax.plot(*zip(*raw, strict=True), color="C0", alpha=0.3, linewidth=1, label="loss per step")
    ax.plot(*zip(*points, strict=True), color="C0", label="smoothed loss")
    if is_number(finder.get("chosen")):
        ax.axvline(finder["chosen"], color="C3", linestyle="--", label=f"chosen lr {finder['chosen']:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    image = png(fig, "training loss against learning rate in the range test, and the rate chosen")
    return h2("lr_finder", "Learning-rate range test") + image + table(None, facts.items())


def _training(files: RunFiles) -> str:
    train = [r for r in files.kind("train") if is_number(r.get("loss"))]
    if not train:
        return ""
    fig = figure(7.5, 3.2)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="C0", label="train loss")
    val = [r for r in files.kind("eval") if is_number((r.get("metrics") or {}).get("loss"))]
    if val:
        ax.plot([r["step"] for r in val], [r["metrics"]["loss"] for r in val], "o--", color="C2", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    lrs = [(r["step"], r["lr"]) for r in train if is_number(r.get("lr"))]
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs, strict=True), color="C1", linestyle=":", label="learning rate")
        twin.set_ylabel("learning rate", color="C1")
    return h2("training", "Training loss") + png(fig, "training loss and learning rate by step")


def _memory(files: RunFiles) -> str:
    """Resident memory at each logged step and evaluation, and the peak so far: a rise of the peak
    between two points says which phase (training steps or an evaluation) raised it."""
    points = sorted(
        (
            (r["step"], r["kind"], r["rss_mb"], r["peak_rss_mb"])
            for r in (*files.kind("train"), *files.kind("eval"))
            if is_number(r.get("rss_mb")) and is_number(r.get("peak_rss_mb"))
        ),
        key=lambda p: p[0],
    )
    if not points:
        return ""
    fig = figure(7.5, 3.0)
    ax = fig.add_subplot()
    steps = [p[0] for p in points]
    ax.plot(steps, [p[3] / 1024 for p in points], color="C3", label="peak so far")
    ax.plot(steps, [p[2] / 1024 for p in points], color="C0", alpha=0.7, label="resident now")
    evals = [p for p in points if p[1] == "eval"]
    if evals:
        ax.plot([p[0] for p in evals], [p[2] / 1024 for p in evals], "s", color="C2", label="after an evaluation")
    ax.set_xlabel("step")
    ax.set_ylabel("GB")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return h2("memory", "Memory") + png(fig, "resident memory by step")


def _validation(files: RunFiles) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    for record in files.kind("eval"):
        for name, value in (record.get("metrics") or {}).items():
            if is_number(value) and name not in SIZE_METRICS:
                series.setdefault(name, []).append((record["step"], value))
    if not series:
        return ""
    baseline = scalars(((files.evals or {}).get("baseline") or {}).get("validation") or {})
    return h2("validation", "Validation metrics") + series_png(series, baseline, "validation metrics by step")


def _confusion(files: RunFiles) -> str:
    found = [(s, m) for s, m in (files.evals or {}).items() if s in SPLITS and isinstance(m, dict)]
    evals = [r for r in files.kind("eval") if (r.get("metrics") or {}).get("confusion")]
    if files.evals is None and evals:  # unfinished: the latest evaluation's matrix
        found = [(f"validation, step {evals[-1].get('step')}", evals[-1]["metrics"])]
    parts = []
    for split, metrics in found:
        if metrics.get("confusion"):
            matrix, labels = _matrix_and_labels(metrics["confusion"], files.labels or (files.plan or {}).get("labels"))
            f1 = metrics.get("f1_per_class") or {}
            parts.append(f"<h3>{esc(split)}</h3>" + _confusion_table(matrix, labels, f1))
    return (h2("confusion", "Confusion matrix") + "".join(parts)) if parts else ""


def _matrix_and_labels(confusion: Any, fallback: Sequence[str] | None) -> tuple[list[list[int]], list[str]]:
    """Accepts {"labels", "matrix"} (eval/metrics.py) or a bare list of lists."""
    matrix = confusion.get("matrix", []) if isinstance(confusion, dict) else confusion
    labels = confusion.get("labels") if isinstance(confusion, dict) else None
    labels = labels or fallback
    if not labels or len(labels) != len(matrix):
        labels = [str(i) for i in range(len(matrix))]
    return matrix, [str(x) for x in labels]


def _confusion_table(matrix: list[list[int]], labels: list[str], f1: Mapping[str, Any]) -> str:
    """Rows: true label, columns: predicted; each cell shaded by its share of the row."""
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{esc(x)}</th>" for x in labels) + "<th>total</th>"
    head += "<th>F1</th></tr>" if f1 else "</tr>"
    rows = []
    for label, row in zip(labels, matrix, strict=True):
        total = sum(row)
        cells = []
        for predicted, count in zip(labels, row, strict=True):
            share = count / total if total else 0.0
            style = f"background:rgba(31,119,180,{share:.3f});color:{'#fff' if share > 0.6 else '#222'}"
            title = f"true {label}, predicted {predicted}: {count}"
            cells.append(f"<td class='num cm' style='{style}' title='{esc(title)}'>{count}</td>")
        extra = f"<td class='num'>{fmt(f1.get(label))}</td>" if f1 else ""
        rows.append(f"<tr><th>{esc(label)}</th>{''.join(cells)}<td class='num'>{total}</td>{extra}</tr>")
    return f"<table class='confusion'>{head}{''.join(rows)}</table>"


def _retention(files: RunFiles) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    baseline: dict[str, float] = {}
    for record in files.kind("retention"):
        name = str(record.get("metric", "retention"))
        if is_number(record.get("value")):
            series.setdefault(name, []).append((record["step"], record["value"]))
        if is_number(record.get("baseline")):
            baseline[name] = record["baseline"]
    summary = (files.evals or {}).get("retention")
    if not series and not summary:
        return ""
    image = series_png(series, baseline, "retention by step against the base model") if series else ""
    summary_html = table(None, summary.items()) if isinstance(summary, dict) else ""
    return h2("retention", "Retention (what the base model knew)") + image + summary_html


def _samples(files: RunFiles) -> str:
    logged = [r for r in files.kind("samples") if r.get("samples")]
    if not logged:
        return ""
    latest = logged[-1]
    rows = [[pre(s.get("prompt")), pre(s.get("output"))] for s in latest["samples"] if isinstance(s, dict)]
    title = f"Generated samples (step {esc(latest.get('step'))})"
    return h2("samples", title) + table(["prompt", "output"], rows, escape=False)


def _final_metrics(files: RunFiles) -> str:
    if not files.evals:
        return ""
    baseline = files.evals.get("baseline") or {}
    parts = []
    for split in SPLITS:
        final = scalars(files.evals.get(split) or {})
        if final:
            before = scalars(baseline.get(split) or {})
            if before:
                rows = [[k, before.get(k), v, f"{v - before[k]:+.4g}" if k in before else ""] for k, v in final.items()]
                parts.append(f"<h3>{split}</h3>" + table(["metric", "baseline", "final", "change"], rows))
            else:
                parts.append(f"<h3>{split}</h3>" + table(["metric", "value"], list(final.items())))
    train = files.evals.get("train")
    if isinstance(train, dict):
        best = train.get("best") or {}
        shown = {**train, "best": f"{best.get('metric')} {fmt(best.get('value'))} at step {best.get('step')}"}
        parts.append("<h3>training</h3>" + table(None, (shown if best else train).items()))
    return (h2("final", "Final metrics") + "".join(parts)) if parts else ""


def _data_report(files: RunFiles) -> str:
    report = files.data_report
    if not isinstance(report, dict):
        return ""
    verdict = mark(report.get("passed")) + f" {fmt(report.get('rows'))} rows"
    rows = []
    for f in report.get("findings") or []:
        examples = "".join(f"<li><code>{esc(clip(x))}</code></li>" for x in (f.get("examples") or [])[:3])
        cells = [esc(f.get("name")), *(fmt(f.get(k)) for k in ("count", "share", "limit")), mark(f.get("passed"))]
        rows.append([*cells, f"<ul>{examples}</ul>" if examples else ""])
    parts = [f"<p>{verdict}</p>"]
    if rows:
        parts.append(table(["check", "count", "share", "limit", "result", "examples"], rows, escape=False))
    for key, title in (("label_counts", "label counts"), ("lengths", "lengths")):
        if isinstance(report.get(key), dict) and report[key]:
            parts.append(f"<h3>{title}</h3>" + table(None, report[key].items()))
    return h2("data", "Data report") + "".join(parts)


def _plan(files: RunFiles) -> str:
    plan = files.plan
    if not isinstance(plan, dict):
        return ""
    rows = pick(plan, "rows", "total_steps", "lr", "head_lr", "lr_rule", "precision", "template")
    trainable, total = plan.get("trainable_parameters"), plan.get("total_parameters")
    if isinstance(trainable, int) and isinstance(total, int) and total:
        rows["trainable parameters"] = f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    if plan.get("labels"):
        rows["labels"] = plan["labels"]
    parts = [table(None, rows.items())]
    encoded = plan.get("rows_encoded")
    if isinstance(encoded, dict) and encoded:
        keys = list(dict.fromkeys(k for counts in encoded.values() for k in counts))
        parts.append(table(["split", *keys], [[s, *(c.get(k) for k in keys)] for s, c in encoded.items()]))
    return h2("plan", "Plan") + "".join(parts)


def _manifest(files: RunFiles) -> str:
    m = files.manifest
    if not isinstance(m, dict):
        return ""
    rows = pick(m, "created", "seed", "python", "git_sha")
    rows["packages"] = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items() if v)
    rows["hardware"] = ", ".join(f"{k} {v}" for k, v in (m.get("hardware") or {}).items())
    for path, digest in (m.get("data") or {}).items():
        rows[f"data {path}"] = str(digest)[:12]
    base = m.get("base_model") or {}
    if base:
        rows["base model"] = f"{base.get('path')} ({str(base.get('sha256'))[:12]})"
    return h2("manifest", "Manifest") + table(None, rows.items())
