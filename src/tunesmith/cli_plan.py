"""`tunesmith plan`: a run checked before it trains (the work happens in tunesmith.api.plan)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

__all__ = ["plan"]

console = Console()
err_console = Console(stderr=True, soft_wrap=True)


def plan(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. train.lr=1e-4")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    memory_limit: Annotated[
        float | None,
        typer.Option("--memory-limit", min=0, help="GB (2^30 bytes) the run may use (default: what is available)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run/--estimate-only", help="Measure three real steps, or only estimate.")
    ] = True,
) -> None:
    """Check a run before it trains: parameters, estimated and measured peak memory and step time
    (three real steps in a temporary directory), and the projected time of the whole run. Exits 1
    when the peak does not fit in memory, naming the settings that would lower it."""
    from tunesmith import api

    report = api.plan(config, overrides=overrides or [], memory_limit_gb=memory_limit, dry_run=dry_run)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_plan(str(config), report)
    if not report["memory"]["fits"]:
        _warn(report)
        raise typer.Exit(1)


def _print_plan(config: str, r: dict[str, Any]) -> None:
    p, est, got, err = r["parameters"], r["estimate"], r["measured"] or {}, r["error"] or {}
    console.print(f"[bold]{config}[/bold]: {r['model']}, {r['task']}, {r['method']}, {r['precision']}")
    share = p["trainable"] / max(1, p["total"])
    console.print(f"parameters: {p['total']:,} total, {p['trainable']:,} trainable ({share:.2%})")
    batch = est["batch"]
    console.print(f"steps: {r['steps']:,}; largest micro-batch {batch['rows']} rows x length {batch['length']}")
    mem = est["memory_mb"]
    table = Table("", "estimate", "measured", "estimate / measured", box=None)
    table.add_row("training memory", _mb(mem["total"]), _mb(got.get("training_mb")), _ratio(err.get("memory")))
    table.add_row("  weights", _mb(mem["weights"]), _mb(got.get("model_mb")), "")
    table.add_row("  gradients + AdamW", _mb(mem["gradients"] + mem["optimizer"]), "", "")
    acts = _ratio(err.get("activations"))
    table.add_row("  activations", _mb(mem["activations"]), _mb(got.get("activations_mb")), acts)
    table.add_row("process peak", _mb(mem["process_peak"]), _mb(got.get("peak_rss_mb")), "")
    step = _seconds(est["step_seconds"])
    table.add_row("step time", step, _seconds(got.get("step_seconds")), _ratio(err.get("step_time")))
    table.add_row("first step", "", _seconds(got.get("first_step_seconds")), "")
    table.add_row("evaluation batch", "", _seconds(got.get("eval_batch_seconds")), "")
    console.print(table)
    console.print(
        f"estimate at {est['matmul_gflops']:.0f} GFLOP/s (a matmul measured now); the process holds "
        f"{r['memory']['besides_training_mb']:,.0f} MB besides training (interpreter, libraries, data)"
    )
    if "dry_run_skipped" in r:
        console.print(f"dry run skipped: {r['dry_run_skipped']}")
    t = r["projected"]
    console.print(
        f"projected run ({t['basis']}): {_duration(t['total_seconds'])} = {_duration(t['train_seconds'])} training "
        f"+ {_duration(t['evaluation_seconds'])} for {t['evaluation_passes']:g} evaluation passes"
    )
    m = r["memory"]
    verdict = "fits" if m["fits"] else "does NOT fit"
    console.print(f"memory: needs {m['needed_mb']:,.0f} MB of {m['limit_mb']:,.0f} MB: {verdict}")
    checkpointing = r.get("gradient_checkpointing")  # train.gradient_checkpointing: auto, as decided
    if checkpointing is not None:
        state = "on" if checkpointing["on"] else "off"
        console.print(f"gradient checkpointing (auto): {state}, {checkpointing['reason']}")


def _warn(r: dict[str, Any]) -> None:
    m = r["memory"]
    err_console.print(
        f"[bold yellow]warning:[/] the run needs ~{m['needed_mb']:,.0f} MB, more than the {m['limit_mb']:,.0f} MB "
        "it may use; settings that lower the peak, the largest saving first:"
    )
    for lever in r.get("levers", []):
        err_console.print(f"  {lever['setting']}  saves ~{lever['saves_mb']:,.0f} MB ({lever['note']})")
    if not r.get("levers"):
        err_console.print("  none of batch size, checkpointing, max_length or a PEFT method applies")


def _mb(value: float | None) -> str:
    return "" if value is None else f"{value:,.0f} MB"


def _seconds(value: float | None) -> str:
    return "" if value is None else f"{value:.3g} s"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
