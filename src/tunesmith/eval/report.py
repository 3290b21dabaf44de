"""The run report (DESIGN §9): one self-contained `report.html` built only from a run directory.

Loss and learning-rate curves, validation metrics, the confusion matrix, retention against its
baseline, generated samples, final metrics, the data report, plan and manifest. Plots are PNGs
embedded as base64 (matplotlib's Agg canvas, no pyplot state), so the file reads offline with no
server; every piece of text from the run is escaped. A missing file just omits its sections.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.runs import atomic_write_text, open_run

__all__ = ["RunFiles", "read_run_files", "write_report"]

SPLITS = ("validation", "test")
SIZE_METRICS = ("count", "tokens", "answered")  # sizes, not quality: tabulated, never plotted
CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37}.fail{color:#cf222e}.meta{color:#555}pre{white-space:pre-wrap;margin:0}img{max-width:100%}
"""


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
        return [r for r in self.records if r.get("kind") == kind and _is_number(r.get("step"))]


def write_report(run_dir: str | Path) -> Path:
    """Write `run_dir/report.html` (atomically) from the files the run directory holds.

    Works on unfinished runs too: sections whose files or records are missing are left out.

    Raises:
        ConfigError: `run_dir` has no config.yaml, or one of its JSON files cannot be read.
    """
    files = read_run_files(Path(run_dir))
    sections = (_header, _settings, _training, _validation, _confusion, _retention, _samples, _final_metrics)
    body = "".join(section(files) for section in (*sections, _data_report, _plan, _manifest))
    path = files.dir / "report.html"
    atomic_write_text(path, _page(f"tunesmith run {files.dir.name}", body))
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
    meta = " · ".join(f"{k} {_e(v.get('name', '?') if isinstance(v, dict) else v)}" for k, v in what.items())
    note = f"<p class='fail'>{files.unreadable_lines} unreadable line(s) of metrics.jsonl skipped</p>"
    return f"<h1>{_e(files.dir.name)}</h1><p class='meta'>{meta} · {_status(files)}</p>" + (
        note if files.unreadable_lines else ""
    )


def _status(files: RunFiles) -> str:
    stops = files.kind("early_stop")
    if files.evals is not None:
        early = f", stopped early at step {_e(stops[-1].get('step'))}" if stops else ""
        return f"<strong class='pass'>finished</strong>{early}"
    steps = [r["step"] for r in files.kind("train")]
    total = (files.plan or {}).get("total_steps")
    where = f" (step {max(steps)}{f' of {_e(total)}' if total else ''})" if steps else ""
    return f"<strong class='fail'>unfinished</strong>{where}"


def _settings(files: RunFiles) -> str:
    cfg = files.config
    method, train, data, evals = (_section(cfg, k) for k in ("method", "train", "data", "eval"))
    rows = {f"method.{k}": v for k, v in method.items() if k != "name" and v is not None}
    rows |= _pick(train, "epochs", "max_steps", "batch_size", "grad_accum", "lr", "scheduler", "warmup_ratio")
    rows |= _pick(train, "weight_decay", "precision", "seed", "early_stopping")
    rows |= {f"data.{k}": v for k, v in _pick(data, "train", "validation", "test", "max_length", "template").items()}
    rows |= {f"eval.{k}": v for k, v in _pick(evals, "metric", "baseline", "retention").items()}
    full = f"<details><summary>config.yaml</summary><pre>{_e(files.config_text)}</pre></details>"
    return _h2("settings", "Settings") + _table(None, rows.items()) + full


def _training(files: RunFiles) -> str:
    train = [r for r in files.kind("train") if _is_number(r.get("loss"))]
    if not train:
        return ""
    fig = _figure(7.5, 3.2)
    ax = fig.add_subplot()
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="C0", label="train loss")
    val = [r for r in files.kind("eval") if _is_number((r.get("metrics") or {}).get("loss"))]
    if val:
        ax.plot([r["step"] for r in val], [r["metrics"]["loss"] for r in val], "o--", color="C2", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    lrs = [(r["step"], r["lr"]) for r in train if _is_number(r.get("lr"))]
    if lrs:
        twin = ax.twinx()
        twin.plot(*zip(*lrs, strict=True), color="C1", linestyle=":", label="learning rate")
        twin.set_ylabel("learning rate", color="C1")
    return _h2("training", "Training loss") + _png(fig, "training loss and learning rate by step")


def _validation(files: RunFiles) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    for record in files.kind("eval"):
        for name, value in (record.get("metrics") or {}).items():
            if _is_number(value) and name not in SIZE_METRICS:
                series.setdefault(name, []).append((record["step"], value))
    if not series:
        return ""
    baseline = _scalars(((files.evals or {}).get("baseline") or {}).get("validation") or {})
    return _h2("validation", "Validation metrics") + _series_png(series, baseline, "validation metrics by step")


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
            parts.append(f"<h3>{_e(split)}</h3>" + _confusion_table(matrix, labels, f1))
    return (_h2("confusion", "Confusion matrix") + "".join(parts)) if parts else ""


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
    head = "<tr><th>true \\ predicted</th>" + "".join(f"<th>{_e(x)}</th>" for x in labels) + "<th>total</th>"
    head += "<th>F1</th></tr>" if f1 else "</tr>"
    rows = []
    for label, row in zip(labels, matrix, strict=True):
        total = sum(row)
        cells = []
        for predicted, count in zip(labels, row, strict=True):
            share = count / total if total else 0.0
            style = f"background:rgba(31,119,180,{share:.3f});color:{'#fff' if share > 0.6 else '#222'}"
            title = f"true {label}, predicted {predicted}: {count}"
            cells.append(f"<td class='num cm' style='{style}' title='{_e(title)}'>{count}</td>")
        extra = f"<td class='num'>{_fmt(f1.get(label))}</td>" if f1 else ""
        rows.append(f"<tr><th>{_e(label)}</th>{''.join(cells)}<td class='num'>{total}</td>{extra}</tr>")
    return f"<table class='confusion'>{head}{''.join(rows)}</table>"


def _retention(files: RunFiles) -> str:
    series: dict[str, list[tuple[float, float]]] = {}
    baseline: dict[str, float] = {}
    for record in files.kind("retention"):
        name = str(record.get("metric", "retention"))
        if _is_number(record.get("value")):
            series.setdefault(name, []).append((record["step"], record["value"]))
        if _is_number(record.get("baseline")):
            baseline[name] = record["baseline"]
    summary = (files.evals or {}).get("retention")
    if not series and not summary:
        return ""
    image = _series_png(series, baseline, "retention by step against the base model") if series else ""
    table = _table(None, summary.items()) if isinstance(summary, dict) else ""
    return _h2("retention", "Retention (what the base model knew)") + image + table


def _samples(files: RunFiles) -> str:
    logged = [r for r in files.kind("samples") if r.get("samples")]
    if not logged:
        return ""
    latest = logged[-1]
    rows = [[_pre(s.get("prompt")), _pre(s.get("output"))] for s in latest["samples"] if isinstance(s, dict)]
    title = f"Generated samples (step {_e(latest.get('step'))})"
    return _h2("samples", title) + _table(["prompt", "output"], rows, escape=False)


def _final_metrics(files: RunFiles) -> str:
    if not files.evals:
        return ""
    baseline = files.evals.get("baseline") or {}
    parts = []
    for split in SPLITS:
        final = _scalars(files.evals.get(split) or {})
        if final:
            before = _scalars(baseline.get(split) or {})
            if before:
                rows = [[k, before.get(k), v, f"{v - before[k]:+.4g}" if k in before else ""] for k, v in final.items()]
                parts.append(f"<h3>{split}</h3>" + _table(["metric", "baseline", "final", "change"], rows))
            else:
                parts.append(f"<h3>{split}</h3>" + _table(["metric", "value"], list(final.items())))
    train = files.evals.get("train")
    if isinstance(train, dict):
        best = train.get("best") or {}
        shown = {**train, "best": f"{best.get('metric')} {_fmt(best.get('value'))} at step {best.get('step')}"}
        parts.append("<h3>training</h3>" + _table(None, (shown if best else train).items()))
    return (_h2("final", "Final metrics") + "".join(parts)) if parts else ""


def _data_report(files: RunFiles) -> str:
    report = files.data_report
    if not isinstance(report, dict):
        return ""
    verdict = _mark(report.get("passed")) + f" {_fmt(report.get('rows'))} rows"
    rows = []
    for f in report.get("findings") or []:
        examples = "".join(f"<li><code>{_e(_clip(x))}</code></li>" for x in (f.get("examples") or [])[:3])
        cells = [_e(f.get("name")), *(_fmt(f.get(k)) for k in ("count", "share", "limit")), _mark(f.get("passed"))]
        rows.append([*cells, f"<ul>{examples}</ul>" if examples else ""])
    parts = [f"<p>{verdict}</p>"]
    if rows:
        parts.append(_table(["check", "count", "share", "limit", "result", "examples"], rows, escape=False))
    for key, title in (("label_counts", "label counts"), ("lengths", "lengths")):
        if isinstance(report.get(key), dict) and report[key]:
            parts.append(f"<h3>{title}</h3>" + _table(None, report[key].items()))
    return _h2("data", "Data report") + "".join(parts)


def _plan(files: RunFiles) -> str:
    plan = files.plan
    if not isinstance(plan, dict):
        return ""
    rows = _pick(plan, "rows", "total_steps", "lr", "precision", "template")
    trainable, total = plan.get("trainable_parameters"), plan.get("total_parameters")
    if isinstance(trainable, int) and isinstance(total, int) and total:
        rows["trainable parameters"] = f"{trainable:,} of {total:,} ({100 * trainable / total:.2f}%)"
    if plan.get("labels"):
        rows["labels"] = plan["labels"]
    parts = [_table(None, rows.items())]
    encoded = plan.get("rows_encoded")
    if isinstance(encoded, dict) and encoded:
        keys = list(dict.fromkeys(k for counts in encoded.values() for k in counts))
        parts.append(_table(["split", *keys], [[s, *(c.get(k) for k in keys)] for s, c in encoded.items()]))
    return _h2("plan", "Plan") + "".join(parts)


def _manifest(files: RunFiles) -> str:
    m = files.manifest
    if not isinstance(m, dict):
        return ""
    rows = _pick(m, "created", "seed", "python", "git_sha")
    rows["packages"] = ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items() if v)
    rows["hardware"] = ", ".join(f"{k} {v}" for k, v in (m.get("hardware") or {}).items())
    for path, digest in (m.get("data") or {}).items():
        rows[f"data {path}"] = str(digest)[:12]
    base = m.get("base_model") or {}
    if base:
        rows["base model"] = f"{base.get('path')} ({str(base.get('sha256'))[:12]})"
    return _h2("manifest", "Manifest") + _table(None, rows.items())


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}">'


def _series_png(series: dict[str, list[tuple[float, float]]], baseline: Mapping[str, float], alt: str) -> str:
    """One small plot per named series, with its baseline (if any) as a dashed line."""
    cols = min(len(series), 3)
    fig = _figure(3.4 * cols, 2.7 * math.ceil(len(series) / cols))
    axes = fig.subplots(math.ceil(len(series) / cols), cols, squeeze=False).ravel()
    for ax, (name, points) in zip(axes, series.items(), strict=False):
        ax.plot(*zip(*points, strict=True), "o-", markersize=3, label="run")
        if _is_number(baseline.get(name)):
            ax.axhline(baseline[name], color="grey", linestyle="--", label="baseline")
            ax.legend(fontsize=8)
        ax.set_title(name.replace("$", r"\$"))  # a "$" would start matplotlib's mathtext
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(series) :]:
        ax.set_visible(False)
    return _png(fig, alt)


def _page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
        f"<style>{CSS}</style></head>\n<body>{body}\n</body></html>\n"
    )


def _h2(anchor: str, title: str) -> str:
    return f"\n<h2 id='{anchor}'>{_e(title)}</h2>"


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]], escape: bool = True) -> str:
    """A table; with `escape` cells are values to format, without it they are HTML already."""
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>" if header else ""
    body = []
    for row in rows:
        if escape:
            cells = [f"<td class='num'>{_fmt(c)}</td>" if _is_number(c) else f"<td>{_fmt(c)}</td>" for c in row]
        else:
            cells = [f"<td>{c}</td>" for c in row]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>" if head or body else ""


def _fmt(value: Any) -> str:
    """A value as escaped text: numbers to four significant digits, flat containers as lists, others as JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.0f}" if math.isfinite(value) and abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, list) and all(isinstance(v, str | int | float) for v in value):
        return _e(", ".join(map(str, value)))
    if isinstance(value, dict) and all(isinstance(v, str | int | float) for v in value.values()):
        return ", ".join(f"{_e(k)} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, dict | list):
        return _e(json.dumps(value, ensure_ascii=False))
    return _e(value)


def _mark(passed: Any) -> str:
    if passed is None:
        return ""
    return "<span class='pass'>✓ pass</span>" if passed else "<span class='fail'>✗ fail</span>"


def _pre(value: Any) -> str:
    text = "" if value is None else str(value)
    return f"<pre>{_e(text if text.strip() or not text else repr(text))}</pre>"  # show a blank answer's whitespace


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _clip(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def _pick(mapping: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: mapping[k] for k in keys if mapping.get(k) is not None}


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if _is_number(v)}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
