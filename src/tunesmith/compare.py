"""Side-by-side runs of one config: several methods, or few-shot sizes over several seeds.

Each variant is a normal run (its own run directory) started in its own process, so its peak
memory is its own. `--methods` gives each method its own default learning rate (`train.lr` reset)
unless an override sets one (`train.lr=auto`: each method's range test picks its rate);
`--shots K1,K2 --seeds N` trains on K rows per label with seeds 0..N-1 and reports the mean and
spread over seeds, since a few-shot result depends on which K rows were drawn.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith import registry
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.runs import atomic_write_text

__all__ = ["Variant", "compare", "headline", "plan_variants"]


def headline(task: str) -> tuple[str, ...]:
    """The metrics a task puts first (its columns in the tables)."""
    return registry.task_class(task).headline  # type: ignore[no-any-return]


@dataclass(frozen=True)
class Variant:
    label: str  # e.g. "lora" or "shots=8 seed=1"
    overrides: tuple[str, ...]
    group: str  # rows of one group are summarised together (same method / same K)


@dataclass
class Outcome:
    variant: Variant
    run_dir: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    plan: dict[str, Any] = field(default_factory=dict)  # plan.json: the rates it trained at


def plan_variants(methods: list[str] | None, shots: list[int] | None, seeds: int) -> list[Variant]:
    """The runs to make: one per method, or one per (K, seed)."""
    if bool(methods) == bool(shots):
        raise ConfigError("compare: give either --methods or --shots")
    if methods:
        return [Variant(m, (f"method.name={m}", "train.lr=null"), m) for m in methods]
    assert shots is not None
    return [
        Variant(f"shots={k} seed={s}", (f"data.few_shot={k}", f"train.seed={s}"), f"{k} per label")
        for k in shots
        for s in range(seeds)
    ]


def compare(
    config: str | Path, variants: list[Variant], overrides: list[str] | None = None, out_dir: str | Path | None = None
) -> tuple[list[dict[str, Any]], Path]:
    """Run every variant, then write `compare-<time>.md` and `.html` beside the runs.

    Returns:
        (one summary row per group, the Markdown file's path)
    """
    cfg = load_config(config, overrides)  # fail fast on a bad config, before any run
    out = Path(out_dir or cfg.output.dir) / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for variant in variants:
        print(f"compare: {variant.label} ...", file=sys.stderr, flush=True)
        outcomes.append(_run(config, variant, _variant_overrides(variant, overrides or []), out))
    rows = summarize(outcomes, cfg.task)
    markdown = to_markdown(rows, cfg.task, Path(config).name)
    path = out / "compare.md"
    atomic_write_text(path, markdown)
    atomic_write_text(out / "compare.html", to_html(markdown))
    atomic_write_text(out / "compare.json", json.dumps(rows, indent=2, default=str))
    return rows, path


def _variant_overrides(variant: Variant, overrides: list[str]) -> list[str]:
    """The command line's overrides, then the variant's; a key the command line sets keeps its value
    where the variant would only reset it (`train.lr=null`)."""
    given = {o.partition("=")[0].strip() for o in overrides}
    resets = [o for o in variant.overrides if o.endswith("=null") and o.partition("=")[0] in given]
    return [*overrides, *(o for o in variant.overrides if o not in resets)]


def _run(config: str | Path, variant: Variant, overrides: list[str], out: Path) -> Outcome:
    name = variant.label.replace(" ", "-").replace("=", "")
    cmd = [sys.executable, "-m", "tunesmith.cli", "train", str(config), *overrides]
    cmd += [f"output.dir={out}", f"output.name={name}"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    runs = sorted(out.glob(f"{name}-*"))
    if done.returncode != 0 or not runs or not (runs[-1] / "eval.json").is_file():
        lines = (done.stderr or done.stdout).strip().splitlines()
        return Outcome(variant, runs[-1] if runs else None, error=lines[-1] if lines else "failed")
    plan = runs[-1] / "plan.json"
    planned = json.loads(plan.read_text(encoding="utf-8")) if plan.is_file() else {}
    return Outcome(variant, runs[-1], json.loads((runs[-1] / "eval.json").read_text(encoding="utf-8")), plan=planned)


def summarize(outcomes: list[Outcome], task: str) -> list[dict[str, Any]]:
    """One row per group: headline metrics and held-out loss (mean and spread over seeds), learning
    rates, trainable parameters, wall time, peak memory, forgetting (retention change), run directories."""
    groups: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        groups.setdefault(outcome.variant.group, []).append(outcome)
    rows = []
    for group, members in groups.items():
        ok = [m for m in members if m.error is None]
        row: dict[str, Any] = {"variant": group, "runs": len(members), "failed": len(members) - len(ok)}
        if not ok:
            row["error"] = members[0].error
            rows.append(row)
            continue
        held = [m.metrics.get("test") or m.metrics.get("validation") or {} for m in ok]
        for key in _columns(task):
            values = [float(h[key]) for h in held if key in h]
            if values:
                row[key] = statistics.mean(values)
                row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for key in ("lr", "head_lr"):
            rates = [float(m.plan[key]) for m in ok if isinstance(m.plan.get(key), int | float)]
            if rates:
                row[key] = statistics.geometric_mean(rates)  # one rate per seed where lr: auto chose it
        train = [m.metrics["train"] for m in ok]
        row["trainable_parameters"] = train[0]["trainable_parameters"]
        row["wall_seconds"] = statistics.mean(t["wall_seconds"] for t in train)
        row["peak_rss_mb"] = max(t["peak_rss_mb"] for t in train)
        changes = [m.metrics["retention"]["change"] for m in ok if "retention" in m.metrics]
        if changes:
            row["retention_change"] = statistics.mean(changes)
        row["run_dirs"] = [str(m.run_dir) for m in ok]
        rows.append(row)
    return rows


def _columns(task: str) -> tuple[str, ...]:
    """The task's headline metrics, then the held-out loss where the headline leaves it out."""
    keys = headline(task)
    return keys if "loss" in keys else (*keys, "loss")


def to_markdown(rows: list[dict[str, Any]], task: str, title: str) -> str:
    keys = tuple(k for k in _columns(task) if k in headline(task) or any(k in row for row in rows))
    header = ["variant", *keys, "lr (head)", "trainable params", "wall time", "peak memory", "forgetting"]
    lines = [f"# compare: {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['variant']} | failed: {row['error']} |" + " |" * (len(header) - 2))
            continue
        cells = [row["variant"]]
        for key in keys:
            spread = f" ± {row[f'{key}_std']:.4f}" if row["runs"] > 1 else ""
            cells.append(f"{row[key]:.4f}{spread}" if key in row else "-")
        cells.append(_rates(row))
        cells += [f"{row['trainable_parameters']:,}", f"{row['wall_seconds']:.0f} s", f"{row['peak_rss_mb']:.0f} MB"]
        change = row.get("retention_change")
        cells.append("-" if change is None or math.isnan(change) else f"{100 * change:+.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    note = "Mean ± standard deviation over seeds where a variant ran more than once; forgetting is the "
    note += "relative change of the retention metric from the base model (eval.retention)."
    return "\n".join([*lines, "", note, ""])


def _rates(row: dict[str, Any]) -> str:
    """`1e-03 (1e-02)`: the rate, and the new head's where it differs; "-" for runs without a record."""
    if "lr" not in row:
        return "-"
    head = row.get("head_lr")
    return f"{row['lr']:.2g}" + (f" ({head:.2g})" if head is not None and not math.isclose(head, row["lr"]) else "")


def to_html(markdown: str) -> str:
    """The Markdown table as a small standalone HTML page."""
    lines = markdown.splitlines()
    table = [line for line in lines if line.startswith("|") and not line.startswith("|---")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[1:])
    notes = "".join(f"<p>{html.escape(line)}</p>" for line in lines if line and not line.startswith(("|", "#")))
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(lines[0][2:])}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 10px;border-bottom:1px solid #ddd;"
        f"text-align:right}}td:first-child,th:first-child{{text-align:left}}</style><h1>{html.escape(lines[0][2:])}</h1>"
        f"<table><tr>{head}</tr>{body}</table>{notes}"
    )
