"""Small HTML and plotting pieces for the run report: escaped tables and values, and matplotlib
figures (Agg canvas, no pyplot state) embedded as base64 PNGs."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CSS",
    "clip",
    "esc",
    "figure",
    "fmt",
    "h2",
    "is_number",
    "mark",
    "page",
    "pick",
    "png",
    "pre",
    "scalars",
    "section",
    "series_png",
    "table",
]


CSS = """
body{font:14px/1.45 system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1a7f37}.fail{color:#cf222e}.meta{color:#555}pre{white-space:pre-wrap;margin:0}img{max-width:100%}
"""


def figure(width: float, height: float) -> Any:
    """A matplotlib Figure on an Agg canvas (no pyplot, no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Any, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{esc(alt)}">'


def series_png(series: dict[str, list[tuple[float, float]]], baseline: Mapping[str, float], alt: str) -> str:
    """One small plot per named series, with its baseline (if any) as a dashed line."""
    cols = min(len(series), 3)
    fig = figure(3.4 * cols, 2.7 * math.ceil(len(series) / cols))
    axes = fig.subplots(math.ceil(len(series) / cols), cols, squeeze=False).ravel()
    for ax, (name, points) in zip(axes, series.items(), strict=False):
        ax.plot(*zip(*points, strict=True), "o-", markersize=3, label="run")
        if is_number(baseline.get(name)):
            ax.axhline(baseline[name], color="grey", linestyle="--", label="baseline")
            ax.legend(fontsize=8)
        ax.set_title(name.replace("$", r"\$"))  # a "$" would start matplotlib's mathtext
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in axes[len(series) :]:
        ax.set_visible(False)
    return png(fig, alt)


def page(title: str, body: str) -> str:
    return (
        f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{CSS}</style></head>\n<body>{body}\n</body></html>\n"
    )


def h2(anchor: str, title: str) -> str:
    return f"\n<h2 id='{anchor}'>{esc(title)}</h2>"


def table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]], escape: bool = True) -> str:
    """A table; with `escape` cells are values to format, without it they are HTML already."""
    head = "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" if header else ""
    body = []
    for row in rows:
        if escape:
            cells = [f"<td class='num'>{fmt(c)}</td>" if is_number(c) else f"<td>{fmt(c)}</td>" for c in row]
        else:
            cells = [f"<td>{c}</td>" for c in row]
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table>{head}{''.join(body)}</table>" if head or body else ""


def fmt(value: Any) -> str:
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
        return esc(", ".join(map(str, value)))
    if isinstance(value, dict) and all(isinstance(v, str | int | float) for v in value.values()):
        return ", ".join(f"{esc(k)} {fmt(v)}" for k, v in value.items())
    if isinstance(value, dict | list):
        return esc(json.dumps(value, ensure_ascii=False))
    return esc(value)


def mark(passed: Any) -> str:
    if passed is None:
        return ""
    return "<span class='pass'>✓ pass</span>" if passed else "<span class='fail'>✗ fail</span>"


def pre(value: Any) -> str:
    text = "" if value is None else str(value)
    return f"<pre>{esc(text if text.strip() or not text else repr(text))}</pre>"  # show a blank answer's whitespace


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def clip(value: Any, limit: int = 160) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def section(config: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = config.get(key)
    return value if isinstance(value, dict) else {}


def pick(mapping: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    return {k: mapping[k] for k in keys if mapping.get(k) is not None}


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if is_number(v)}


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
