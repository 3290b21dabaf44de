"""The `tunesmith` command: parsing and printing only; the work happens in tunesmith.api."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tunesmith.errors import TunesmithError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune pre-trained models.",
)
runs_app = typer.Typer(no_args_is_help=True, help="List and inspect run directories.")
app.add_typer(runs_app, name="runs")
console = Console()
err_console = Console(stderr=True)

Overrides = Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. train.lr=1e-4")]


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    overrides: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory.")] = None,
) -> None:
    """Fine-tune a model as the config says; writes a run directory."""
    from tunesmith import api

    result = api.train(config, overrides=overrides or [], resume=resume)
    _print_result(result.run_dir, result.metrics)


@app.command()
def validate(config: Annotated[Path, typer.Argument(help="Run config (YAML).")], overrides: Overrides = None) -> None:
    """Check a config (every error at once) and print it resolved, with defaults filled in."""
    import yaml

    from tunesmith.config import load_config

    cfg = load_config(config, overrides or [])
    console.print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="", markup=False, highlight=False)
    err_console.print(f"[green]{config}: valid[/green]")


@app.command("eval")
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    data: Annotated[Path, typer.Option(help="Labelled data file to evaluate on.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Evaluate a trained run on a labelled data file."""
    from tunesmith import api

    metrics = api.evaluate(run_dir, data)
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    _print_metrics(str(data), metrics)


@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    text: Annotated[str | None, typer.Argument(help="Text to classify.")] = None,
    data: Annotated[Path | None, typer.Option(help="Data file: classify every row.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write predictions as JSONL.")] = None,
) -> None:
    """Classify one text, or every row of a data file (JSONL out)."""
    from tunesmith import api
    from tunesmith.runs import atomic_write_text

    if (text is None) == (data is None):
        raise TunesmithError("give one text or --data FILE")
    rows = api.predict(run_dir, texts=[text] if text is not None else None, data=data)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if output is not None:
        atomic_write_text(output, lines)
        err_console.print(f"{len(rows)} predictions written to {output}")
    elif text is not None:
        row = rows[0]
        console.print(f"{row['label']}  ({row['scores'][row['label']]:.3f})")
    else:
        sys.stdout.write(lines)


@app.command()
def methods() -> None:
    """List the fine-tuning methods."""
    from tunesmith.methods import method_descriptions

    table = Table("method", "what it does", box=None)
    for name, doc in method_descriptions().items():
        table.add_row(name, doc)
    console.print(table)


@runs_app.command("ls")
def runs_ls(parent: Annotated[Path, typer.Argument(help="Runs directory.")] = Path("runs")) -> None:
    """List runs with their method and held-out metrics."""
    from tunesmith.runs import list_runs, read_json

    table = Table("run", "method", "status", "accuracy", "macro-F1", box=None)
    for run in list_runs(parent):
        cfg = run.config()
        method = cfg.get("method", {}).get("name", "?")
        done = (run.dir / "eval.json").is_file()
        metrics = read_json(run.dir / "eval.json") if done else {}
        held = metrics.get("test") or metrics.get("validation") or {}
        acc = f"{held['accuracy']:.4f}" if "accuracy" in held else "-"
        f1 = f"{held['macro_f1']:.4f}" if "macro_f1" in held else "-"
        table.add_row(str(run.dir), method, "done" if done else "unfinished", acc, f1)
    console.print(table)


@runs_app.command("show")
def runs_show(run_dir: Annotated[Path, typer.Argument(help="A run directory.")]) -> None:
    """Show a run's config, plan and metrics."""
    from tunesmith.runs import open_run, read_json

    run = open_run(run_dir)
    console.print(f"[bold]{run.dir}[/bold]")
    console.print((run.dir / "config.yaml").read_text(), markup=False, highlight=False)
    if (run.dir / "plan.json").is_file():
        plan = read_json(run.dir / "plan.json")
        plan.pop("trainable_names", None)
        console.print_json(data=plan)
    if (run.dir / "eval.json").is_file():
        for split, metrics in read_json(run.dir / "eval.json").items():
            if split in ("validation", "test"):
                _print_metrics(split, metrics)
            else:
                console.print_json(data={split: metrics})
    else:
        steps = [m for m in run.metrics() if m.get("kind") == "train"]
        console.print(f"unfinished: {len(steps)} logged steps; continue with --resume {run.dir}")


def _print_result(run_dir: Path, metrics: dict[str, Any]) -> None:
    for split in ("validation", "test"):
        if split in metrics:
            _print_metrics(split, metrics[split])
    t = metrics["train"]
    console.print(
        f"trained {t['steps']} steps in {t['train_seconds']:.1f}s "
        f"({t['samples_per_second']:.1f} samples/s, {t['precision']}), "
        f"{t['trainable_parameters']:,} trainable parameters, peak memory {t['peak_rss_mb']:.0f} MB"
    )
    console.print(f"run directory: [bold]{run_dir}[/bold]")


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    table = Table(title=title, box=None)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("accuracy", "macro_f1", "loss", "count"):
        if key in metrics:
            value = metrics[key]
            table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def _quiet_libraries() -> None:
    """Keep the terminal for tunesmith's own progress: no weight-loading bars or library nags."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*gradient.checkpointing.*")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main() -> None:
    """Entry point: user errors print one clear message and exit 2, never a traceback."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    _quiet_libraries()
    try:
        app()
    except TunesmithError as exc:
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)))
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err_console.print("interrupted; continue a run with `tunesmith train CONFIG --resume RUN_DIR`")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
