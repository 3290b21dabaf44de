"""The data quality report for people: a terminal table (rich) with the rows found listed below it,
and a self-contained HTML page (inline CSS, no scripts, no external assets: it opens from disk or
an e-mail attachment)."""

from __future__ import annotations

import html
from typing import Any

from rich.table import Table
from rich.text import Text

from tunesmith.data.quality.report import Finding, QualityReport

__all__ = ["report_details", "report_html", "report_table", "summary_line"]


def summary_line(report: QualityReport) -> str:
    """One line: the file, its rows, and whether every check passed."""
    verdict = (
        "passed"
        if report.passed
        else f"FAILED {len(report.failed)} check(s): {', '.join(f.name for f in report.failed)}"
    )
    line = f"{report.source}: {report.rows:,} rows ({report.task}), {verdict}"
    if report.cleaned is not None:
        dropped = sum(report.cleaned.dropped.values())
        line += f"; kept {report.cleaned.kept:,}, dropped {dropped:,} (see {report.cleaned.dropped_file})"
    return line


def report_table(report: QualityReport) -> Table:
    """The checks as a rich table: check, count, share, limit and result (narrow enough for an
    80-column terminal; the summary line and what was found where are in `report_details`)."""
    table = Table()
    table.add_column("check", no_wrap=True)
    for name in ("count", "share", "limit"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("result", no_wrap=True)
    for f in report.findings:
        table.add_row(f.name, f"{f.count:,}", f"{f.share:.1%}" if f.total else "-", f.limit_text(), _result(f))
    return table


def report_details(report: QualityReport) -> list[str]:
    """Below the table, one block per check that failed or found rows: how it was checked, the fix
    (failed checks), and the first rows found, each on its own line with its full origin."""
    lines: list[str] = []
    for f in report.findings:
        found_rows = f.limit_kind in ("count", "share", None) and f.count > 0 and bool(f.examples)
        if f.passed and not found_rows:
            continue
        state = "FAILED" if not f.passed else "found"
        lines.append(f"{f.name} ({state}, {f.count:,}): {f.detail}" if f.detail else f"{f.name} ({state}, {f.count:,})")
        if f.name == "overlong" and f.stats:
            s = f.stats
            lines.append(f"  lengths: p50 {s['p50']}, p90 {s['p90']}, p99 {s['p99']}, max {s['max']} {s['unit']}")
        lines += [f"  {example}" for example in f.examples]
        if found_rows and f.count > len(f.examples):
            lines.append(f"  ... and {f.count - len(f.examples):,} more")
        if not f.passed:
            lines.append(f"  fix: {f.fix} (limit: {f.setting})")
    return lines


def _result(f: Finding) -> Text:
    if not f.checked:
        return Text("not checked", style="dim")
    if not f.passed:
        return Text("FAIL", style="bold red")
    return Text("ok" if f.limit is not None or not f.count else "found", style="green" if not f.count else "yellow")


_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { border-bottom: 1px solid #ddd; padding: .45em .6em; text-align: left; vertical-align: top; }
td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.fail { color: #b00020; font-weight: 600; } .ok { color: #1b7f3b; } .skip { color: #888; } .found { color: #a66b00; }
.verdict-fail { background: #fde8ec; padding: .6em 1em; } .verdict-ok { background: #e6f4ea; padding: .6em 1em; }
ul { margin: .3em 0; padding-left: 1.2em; } code { font-size: 12px; }
"""


def report_html(report: QualityReport) -> str:
    """The report as one HTML page."""
    verdict = "verdict-ok" if report.passed else "verdict-fail"
    rows = "\n".join(_html_row(f) for f in report.findings)
    cleaned = ""
    if report.cleaned is not None:
        c = report.cleaned
        dropped = "".join(f"<li>{_e(reason)}: {count:,}</li>" for reason, count in c.dropped.items())
        cleaned = (
            f"<h2>Cleaned</h2><p>kept {c.kept:,} rows in <code>{_e(c.output)}</code>; dropped rows with their "
            f"reasons are in <code>{_e(c.dropped_file)}</code>:</p><ul>{dropped}</ul>"
        )
    return (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Data quality: {_e(report.source)}</title><style>{_STYLE}</style></head><body>\n"
        f"<h1>Data quality</h1><p class='{verdict}'>{_e(summary_line(report))}</p>\n"
        f"<p>Lengths are in {report.length_unit}.</p>\n"
        "<table><thead><tr><th>check</th><th>count</th><th>share</th><th>limit</th><th>result</th>"
        f"<th>details</th></tr></thead><tbody>\n{rows}\n</tbody></table>\n{cleaned}\n</body></html>\n"
    )


def _html_row(f: Finding) -> str:
    result = _result(f)
    css = {"FAIL": "fail", "not checked": "skip", "found": "found"}.get(result.plain, "ok")
    details = _e(f.detail)
    if f.name == "overlong" and f.stats:
        details += _stats_table(f.stats, ("p50", "p90", "p99", "max", "mean", "truncated", "dropped"))
    if f.name == "label_balance" and f.stats.get("labels"):
        details += _stats_table(f.stats["labels"], tuple(f.stats["labels"])[:20])  # the 20 largest
    if f.examples:
        details += "<ul>" + "".join(f"<li><code>{_e(example)}</code></li>" for example in f.examples) + "</ul>"
    if not f.passed:
        details += f"<div><b>fix:</b> {_e(f.fix)}</div>"
    share = f"{f.share:.1%}" if f.total else "-"
    return (
        f"<tr><td>{_e(f.name)}</td><td class='n'>{f.count:,}</td><td class='n'>{share}</td>"
        f"<td class='n'>{_e(f.limit_text())}</td><td class='{css}'>{_e(result.plain)}</td><td>{details}</td></tr>"
    )


def _stats_table(stats: dict[str, Any], keys: tuple[str, ...]) -> str:
    def shown(value: Any) -> str:
        return f"{value:,.1f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else str(value)

    head = "".join(f"<th>{_e(str(key))}</th>" for key in keys)
    body = "".join(f"<td class='n'>{_e(shown(stats[key]))}</td>" for key in keys)
    return f"<table><tr>{head}</tr><tr>{body}</tr></table>"


def _e(text: str) -> str:
    return html.escape(text, quote=True)
