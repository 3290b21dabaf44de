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

from tunesmith.cli_data import data_app
from tunesmith.cli_plan import plan
from tunesmith.cli_service import keys_app, serve, worker
from tunesmith.errors import TunesmithError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fine-tune pre-trained models.",
)
runs_app = typer.Typer(no_args_is_help=True, help="List and inspect run directories.")
app.add_typer(runs_app, name="runs")
app.add_typer(data_app, name="data")
app.add_typer(keys_app, name="keys")
app.command()(plan)
app.command()(serve)
app.command()(worker)
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # an error stays one line, whatever its length

Overrides = Annotated[list[str] | None, typer.Argument(help="key.sub=value overrides, e.g. train.lr=1e-4")]


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="Run config (YAML).")],
    overrides: Overrides = None,
    resume: Annotated[Path | None, typer.Option(help="Continue an interrupted run directory.")] = None,
    nproc: Annotated[int, typer.Option(help="Processes on this machine (data parallel; CPUs or GPUs).")] = 1,
    nnodes: Annotated[int, typer.Option(help="Machines taking part, each running this command.")] = 1,
    node_rank: Annotated[int, typer.Option(help="This machine's place among them (0 writes the run).")] = 0,
    master_addr: Annotated[str, typer.Option(help="Address of the node-rank 0 machine.")] = "127.0.0.1",
    master_port: Annotated[
        int | None, typer.Option(help="Its port (default: a free one; 29500 on several machines).")
    ] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option(help="host:port of a c10d rendezvous, instead of --master-addr and --node-rank.")
    ] = None,
) -> None:
    """Fine-tune a model as the config says; writes a run directory."""
    from tunesmith import api

    if nproc > 1 or nnodes > 1:
        from tunesmith.training.distributed import LaunchOptions, launch

        api.load_config(config, overrides or [])  # a bad config is one line here, not one per process
        port = master_port or (29500 if nnodes > 1 else _free_port())
        options = LaunchOptions(nproc, nnodes, node_rank, master_addr, port, rdzv_endpoint)
        args = ["train", str(config), *(overrides or []), *(["--resume", str(resume)] if resume else [])]
        raise typer.Exit(launch(args, options))
    result = api.train(config, overrides=overrides or [], resume=resume)
    if result.main:
        _print_result(result.run_dir, result.metrics)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
    data: Annotated[Path, typer.Option(help="Labelled data file (sft: rows with completions) to evaluate on.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    generations: Annotated[
        Path | None, typer.Option(help="sft: where to write the greedy answers (JSONL; default in the run dir).")
    ] = None,
) -> None:
    """Evaluate a trained run on a data file (sft: loss, perplexity, exact match; answers written)."""
    from tunesmith import api

    metrics = api.evaluate(run_dir, data, generations=generations)
    if as_json:
        print(json.dumps(metrics, indent=2))
        return
    _print_metrics(str(data), metrics)


# Several runs on one base model: RUN_DIR and each --run load as named adapters on one copy of it.
MoreRuns = Annotated[
    list[str] | None,
    typer.Option(
        "--run",
        help="Another run on the same base model, loaded beside RUN_DIR as a named adapter (the base loads "
        "once): DIR, named by its directory's name, or NAME=DIR. Repeat for more.",
    ),
]
Adapter = Annotated[str | None, typer.Option(help="The run that answers, by name (default: RUN_DIR).")]


@app.command()
def predict(
    run_dir: Annotated[str, typer.Argument(help="A finished run directory (or NAME=DIR).")],
    text: Annotated[str | None, typer.Argument(help="Text to classify (an image path for an image run).")] = None,
    data: Annotated[Path | None, typer.Option(help="Data file: classify every row.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write predictions as JSONL.")] = None,
    run: MoreRuns = None,
    adapter: Adapter = None,
) -> None:
    """Classify one text or image, or every row of a data file (JSONL out)."""
    from tunesmith import api
    from tunesmith.runs import atomic_write_text

    if (text is None) == (data is None):
        raise TunesmithError("give one text or --data FILE")
    texts = [text] if text is not None else None
    rows = api.predict([run_dir, *(run or [])], texts=texts, data=data, adapter=adapter)
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
def transcribe(
    run_dir: Annotated[Path, typer.Argument(help="A finished transcription run directory.")],
    audio: Annotated[list[Path] | None, typer.Argument(help="Audio files to transcribe.")] = None,
    data: Annotated[Path | None, typer.Option(help="Data file with an audio column: transcribe every row.")] = None,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Write transcripts as JSONL.")] = None,
) -> None:
    """Transcribe audio files, or every clip of a data file (JSONL out), with a transcription run."""
    from tunesmith import api
    from tunesmith.runs import atomic_write_text

    if bool(audio) == (data is not None):
        raise TunesmithError("give audio files or --data FILE")
    rows = api.transcribe(run_dir, audio=list(audio) if audio else None, data=data)
    lines = "".join(json.dumps(r) + "\n" for r in rows)
    if output is not None:
        atomic_write_text(output, lines)
        err_console.print(f"{len(rows)} transcripts written to {output}")
    elif data is None:
        for row in rows:
            console.print(row["text"] if len(rows) == 1 else f"{row['audio']}\t{row['text']}", markup=False)
    else:
        sys.stdout.write(lines)


@app.command()
def score(
    run_dir: Annotated[Path, typer.Argument(help="A finished reward run directory.")],
    prompt: Annotated[list[str], typer.Option(help="The prompt (repeat with --response for several).")],
    response: Annotated[list[str], typer.Option(help="The response to score, one per --prompt.")],
) -> None:
    """Score responses with a trained reward model (higher is preferred)."""
    from tunesmith import api

    for value in api.score(run_dir, prompt, response):
        console.print(f"{value:.4f}")


MaxNew = Annotated[int, typer.Option(help="Most new tokens per answer.")]
Temperature = Annotated[float, typer.Option(help="Sampling temperature (0 = greedy).")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling: keep the smallest set of tokens with this mass.")]
Seed = Annotated[int, typer.Option(help="Sampling seed.")]


@app.command()
def generate(
    run_dir: Annotated[str, typer.Argument(help="A finished run that generates text: sft, dpo or rl (or NAME=DIR).")],
    prompt: Annotated[str | None, typer.Argument(help="The prompt (rendered as training rendered rows).")] = None,
    data: Annotated[Path | None, typer.Option(help="Data file: answer every row's prompt (JSONL out).")] = None,
    max_new_tokens: MaxNew = 128,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: Seed = 0,
    run: MoreRuns = None,
    adapter: Adapter = None,
) -> None:
    """Generate a completion for a prompt (streamed), or for every prompt of a data file."""
    from tunesmith import api
    from tunesmith.models.generate import Sampling

    if (prompt is None) == (data is None):
        raise TunesmithError("give one prompt or --data FILE")
    sampling = Sampling(max_new_tokens, temperature, top_p, seed)
    runs = [run_dir, *(run or [])]
    if data is not None:
        for row in api.generate_file(runs, data, sampling, adapter=adapter):
            sys.stdout.write(json.dumps(row, ensure_ascii=False) + "\n")
        return
    trained = api.load_adapters(runs, adapter).use()
    _stream(trained, [prompt], sampling, api.runtime_for(trained))


@app.command()
def chat(
    run_dir: Annotated[str, typer.Argument(help="A finished run that generates text: sft, dpo or rl (or NAME=DIR).")],
    system: Annotated[str | None, typer.Option(help="A system message to start the conversation.")] = None,
    max_new_tokens: MaxNew = 256,
    temperature: Temperature = 0.7,
    top_p: TopP = 0.9,
    seed: Seed = 0,
    run: MoreRuns = None,
    adapter: Adapter = None,
) -> None:
    """Talk to a trained model: the chat template applied, tokens streamed. /reset starts over, /exit ends;
    with several runs, /adapters lists them and /adapter NAME switches mid-conversation."""
    from tunesmith import api
    from tunesmith.models.generate import Sampling

    loaded = api.load_adapters([run_dir, *(run or [])], adapter)
    trained = loaded.use()
    runtime = api.runtime_for(trained)
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    several = ", /adapters lists the runs, /adapter NAME switches" if len(loaded.names) > 1 else ""
    err_console.print(f"chat: /reset starts over{several}, /exit (or Ctrl-D) ends")
    turn = 0
    while True:
        try:
            line = input("you> ")
        except EOFError:
            break
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = list(start)
            continue
        if line.split()[:1] in (["/adapters"], ["/adapter"]):
            trained = _adapter_command(loaded, line.split())
            runtime = api.runtime_for(trained)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("model> ")
        reply = _stream(trained, [history], Sampling(max_new_tokens, temperature, top_p, seed + turn), runtime)
        history.append({"role": "assistant", "content": reply})
        turn += 1


def _adapter_command(loaded: Any, words: list[str]) -> Any:
    """`/adapters` lists the loaded runs (* marks the one answering); `/adapter NAME` switches to
    run NAME (an unknown name is said, and the conversation goes on). Returns the run answering."""
    from tunesmith.errors import ConfigError

    if words[0] == "/adapters":
        for name, trained in loaded.runs.items():
            mark = "*" if name == loaded.active else " "
            line = f"{mark} {name}  {trained.where}  ({trained.config.method.name})"
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return loaded.use()
    try:
        return loaded.use(" ".join(words[1:]))
    except ConfigError as exc:
        err_console.print(Text.assemble(("error: ", "bold red"), str(exc)))
        return loaded.use()


def _stream(trained: Any, prompts: list, sampling: Any, runtime: Any) -> str:
    """Generate for one prompt, printing the text as tokens arrive; returns the whole answer."""
    from tunesmith import api

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    stream = api.TextStream(trained.objective.tokenizer, show)
    answer = api.generate_with(trained, prompts, sampling, runtime, stream)[0]
    stream.finish(answer)
    show("\n")
    return answer


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory.")],
    format: Annotated[str, typer.Option("--format", "-f", help="hf, peft, onnx or gguf.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="A new directory for the export.")],
    quantize: Annotated[str | None, typer.Option(help="onnx: int8; gguf: f16, q8_0 or q4_0.")] = None,
    data: Annotated[Path | None, typer.Option(help="Rows to check parity on (default: held-out rows).")] = None,
    rows: Annotated[int, typer.Option(help="How many probe rows.")] = 8,
) -> None:
    """Export a run to transformers, peft, ONNX or GGUF, checked against the trained model first."""
    from tunesmith import api

    done = api.export(run_dir, format, output, quantize=quantize, data=data, rows=rows)
    console.print(f"[green]exported[/] {done.format}{f' ({done.quantize})' if done.quantize else ''} to {done.path}")
    console.print(f"parity: {done.parity.describe()}")
    console.print(
        f"size {done.size_bytes / 1e6:.1f} MB, load {done.load_seconds:.2f} s, {done.latency_ms:.2f} ms per row"
    )
    for key, value in done.details.items():
        console.print(f"{key}: {value}")


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
    """List runs with their task, method and the task's headline held-out metrics."""
    from tunesmith import api

    table = Table("run", "task", "method", "status", "held-out metrics", box=None)
    for run in api.run_summaries(parent):
        shown = ", ".join(f"{key} {value:.4f}" for key, value in run.headline.items()) or "-"
        table.add_row(str(run.dir), run.task, run.method, "done" if run.finished else "unfinished", shown)
    console.print(table)


@runs_app.command("report")
def runs_report(run_dir: Annotated[Path, typer.Argument(help="A run directory (finished or not).")]) -> None:
    """(Re)build a run's report.html: curves, metrics, confusion matrix, retention, data report."""
    from tunesmith.eval.report import write_report

    console.print(f"written: {write_report(run_dir)}")


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


@app.command("compare")
def compare_(
    config: Annotated[Path, typer.Argument(help="Run config (YAML) every variant starts from.")],
    overrides: Overrides = None,
    methods: Annotated[str | None, typer.Option(help="Comma-separated methods, e.g. full,lora,adapter.")] = None,
    shots: Annotated[str | None, typer.Option(help="Comma-separated rows per label, e.g. 8,32,128.")] = None,
    seeds: Annotated[int, typer.Option(help="Seeds per few-shot size (mean and spread reported).")] = 3,
    out: Annotated[Path | None, typer.Option(help="Where the runs and the tables go (default output.dir).")] = None,
) -> None:
    """Run a config with several methods (or few-shot sizes x seeds) and tabulate them side by side."""
    from tunesmith.compare import compare, plan_variants

    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    try:
        shot_list = [int(k) for k in shots.split(",")] if shots else None
    except ValueError:
        raise TunesmithError(f"--shots {shots}: give whole numbers separated by commas, e.g. 8,32,128") from None
    _, path = compare(config, plan_variants(method_list, shot_list, seeds), overrides or [], out)
    console.print(path.read_text(encoding="utf-8"), markup=False, highlight=False)
    err_console.print(f"tables written to {path} and {path.with_suffix('.html')}")


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="Run config (YAML) with a search section.")],
    overrides: Overrides = None,
    trials: Annotated[int, typer.Option(min=1, help="Trials to run (added to those the study has).")] = 20,
    storage: Annotated[str | None, typer.Option(help="Study database URL (default: SQLite beside the runs).")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default: the config file's name).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    report: Annotated[bool, typer.Option("--report", help="Write the study's HTML report and stop.")] = False,
) -> None:
    """Search hyperparameters with Optuna, pruning trials that fall behind at an evaluation."""
    from tunesmith import api

    if report:
        path = api.tune_report(config, storage, study)
        console.print(f"study report: {path}", markup=False, highlight=False)
        return
    result = api.tune(config, trials, overrides or [], storage, study, timeout)
    table = Table(title=f"study {result.study} ({result.storage})")
    for column in ("trial", "state", "value", "steps", "params"):
        table.add_column(column)
    for t in result.trials:
        value = "" if t["value"] is None else f"{t['value']:.4f}"
        table.add_row(str(t["number"]), t["state"], value, str(t["steps"] or ""), json.dumps(t["params"]))
    console.print(table)
    if result.best:
        console.print(
            f"best: trial {result.best['number']} {json.dumps(result.best['params'])} -> {result.best['run_dir']}"
        )


def _print_result(run_dir: Path, metrics: dict[str, Any]) -> None:
    for split in ("validation", "test"):
        if split in metrics:
            _print_metrics(split, metrics[split])
    t = metrics["train"]
    tokens = f"{t['tokens_per_second']:.0f} tokens/s, " if t["tokens"] != t["samples"] else ""  # not for images
    console.print(
        f"trained {t['steps']} steps in {t['train_seconds']:.1f}s "
        f"({t['samples_per_second']:.1f} samples/s, {tokens}{t['precision']}), "
        f"{t['trainable_parameters']:,} trainable parameters, peak memory {t['peak_rss_mb']:.0f} MB"
    )
    console.print(f"run directory: [bold]{run_dir}[/bold]")


def _print_metrics(title: str, metrics: dict[str, Any]) -> None:
    """Every number the task reports (per-class tables and matrices are in eval.json and report.html)."""
    table = Table(title=title, box=None)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
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
