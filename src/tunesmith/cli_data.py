"""The `tunesmith data` commands: `check` a data file against `data.thresholds`, `clean` it.

Parsing and printing only; the work happens in tunesmith.api (and the tasks' checks).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.text import Text

__all__ = ["data_app"]

data_app = typer.Typer(no_args_is_help=True, help="Check the quality of a data file, or write a cleaned copy.")
console = Console()
err_console = Console(stderr=True)

TaskOption = Annotated[
    str | None,
    typer.Option(help="The task whose checks apply (default: the config's task, else classification)."),
]
ConfigOption = Annotated[
    Path | None,
    typer.Option(help="Run config (YAML): its data fields, thresholds, max_length, template and model tokenizer."),
]
ValidationOption = Annotated[
    Path | None,
    typer.Option(help="Validation/test file checked for leakage (default: the config's data.validation/test files)."),
]
MaxLengthOption = Annotated[int | None, typer.Option(min=2, help="Override data.max_length.")]


@data_app.command("check")
def data_check(
    file: Annotated[
        Path, typer.Argument(help="The training data: a file (JSONL, JSON, CSV, TSV, Parquet) or an image folder.")
    ],
    task: TaskOption = None,
    config: ConfigOption = None,
    validation: ValidationOption = None,
    max_length: MaxLengthOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    html: Annotated[Path | None, typer.Option("--html", help="Also write the report as an HTML page.")] = None,
) -> None:
    """Check a data file (duplicates, leakage, lengths, ...) against data.thresholds; exit 1 when a check fails."""
    from tunesmith.api import check_data
    from tunesmith.data.quality.render import report_html
    from tunesmith.runs import atomic_write_text

    report = check_data(file, config, task, validation, max_length)
    if html is not None:
        atomic_write_text(html, report_html(report))
        err_console.print(f"report written to {html}")
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    if not report.passed:
        raise typer.Exit(1)


@data_app.command("clean")
def data_clean(
    file: Annotated[Path, typer.Argument(help="The training data file (JSONL, JSON, CSV, TSV, Parquet).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the kept rows (JSONL).")],
    task: TaskOption = None,
    config: ConfigOption = None,
    validation: ValidationOption = None,
    max_length: MaxLengthOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Write the rows worth keeping to OUTPUT, and each dropped row with its reason to <OUTPUT stem>.dropped.jsonl."""
    from tunesmith.api import clean_data
    from tunesmith.data.quality.render import summary_line

    report = clean_data(file, output, config, task, validation, max_length)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        _print_report(report)
    err_console.print(Text(summary_line(report)))


def _print_report(report: Any) -> None:
    """The verdict, the table of checks, then what each found, one row per line and never cut."""
    from tunesmith.data.quality.render import report_details, report_table, summary_line

    console.print(Text(summary_line(report)), soft_wrap=True)
    console.print(report_table(report))
    for line in report_details(report):
        console.print(Text(line), soft_wrap=True)  # Text: the data's own brackets are not rich markup


@data_app.command("pairs")
def data_pairs(
    prompts: Annotated[str, typer.Argument(help="Prompts: a data file ({prompt} or chat rows) or a packaged name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the pairs (JSONL).")],
    policy: Annotated[str, typer.Option(help="A finished sft/dpo/rl run, or a model to sample from.")],
    reward: Annotated[str, typer.Option(help="A reward run directory, or module:function.")],
    samples: Annotated[int, typer.Option(help="Completions sampled per prompt.")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="Longest completion.")] = 64,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Sample completions per prompt, rank them by a reward, write the best and worst as a preference pair."""
    from tunesmith import api

    sampling = api.Sampling(max_new_tokens, temperature, 1.0, seed)
    summary = api.preference_pairs(prompts, output, policy, reward, samples, sampling)
    err_console.print(
        f"{summary.pairs} pairs from {summary.prompts} prompts written to {summary.output} "
        f"({summary.ties} prompts gave no pair: their samples scored the same)"
    )
