"""Hyperparameter search on Optuna: `tunesmith tune CONFIG --trials N`.

The config's `search` section names the space, by config path:

    search:
      train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}   # a float range (ints when both ends are ints)
      train.batch_size: [16, 32]                         # a choice
    tune: {metric: accuracy, direction: maximize, pruner: median}   # optional; these are the defaults

Each trial is a normal run (its directory under `output.dir/<study>/`), and reports the validation
metric at every evaluation, so a trial that is behind the median of earlier trials at the same step
stops there (Optuna's MedianPruner; `pruner: hyperband` or `none`). The study lives in SQLite beside
the runs by default, or any database URL (`--storage`) that several machines share to run trials in
parallel. `tunesmith tune CONFIG --report` writes the study's HTML report: the best trial, every
trial, parameter importances, and the optimization history and parallel-coordinate plots. With
`train.report_to`, each trial is tracked like any run: in MLflow as a run of the study's experiment,
tagged with `study` and `trial`.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunesmith.config import RunConfig, apply_overrides, config_from_dict, read_yaml_config
from tunesmith.errors import ConfigError
from tunesmith.runs import atomic_write_text

__all__ = ["Search", "TuneResult", "read_search", "tracked_trial", "write_report"]

MINIMIZED = ("loss", "perplexity", "wer", "cer", "kl")


@dataclass(frozen=True)
class Search:
    """A config without its `search` and `tune` sections, the space, and how to judge a trial."""

    base: dict[str, Any]
    space: dict[str, Any]
    metric: str
    direction: Literal["minimize", "maximize"]
    pruner: str
    study: str
    storage: str


@dataclass(frozen=True)
class TuneResult:
    study: str
    storage: str
    best: dict[str, Any]  # {number, value, params, run_dir}
    trials: list[dict[str, Any]]  # {number, state, value, params, steps, run_dir}


def read_search(source: str | Path, overrides: list[str], storage: str | None, study: str | None) -> Search:
    """The search a config file describes.

    Raises:
        ConfigError: no `search` section, or a malformed entry in it or in `tune`.
    """
    data = apply_overrides(read_yaml_config(source), overrides)
    space = data.pop("search", None)
    tune = data.pop("tune", None) or {}
    if not isinstance(space, dict) or not space:
        raise ConfigError(
            f"{source}: no search section; add e.g. search: {{train.lr: {{low: 1.0e-5, high: 1.0e-3, log: true}}}}"
        )
    for key, spec in space.items():
        _check_dimension(f"search.{key}", spec)
    unknown = set(tune) - {"metric", "direction", "pruner"}
    if unknown:
        raise ConfigError(f"tune.{sorted(unknown)[0]}: unknown; tune takes metric, direction and pruner")
    metric = str(tune.get("metric") or _early_stopping_metric(data) or "loss")
    direction: Literal["minimize", "maximize"] = "minimize" if any(w in metric for w in MINIMIZED) else "maximize"
    if tune.get("direction") is not None:
        if tune["direction"] not in ("minimize", "maximize"):
            raise ConfigError(f"tune.direction={tune['direction']!r}: must be minimize or maximize")
        direction = tune["direction"]
    pruner = tune.get("pruner", "median")
    if pruner not in ("median", "hyperband", "none"):
        raise ConfigError(f"tune.pruner={pruner!r}: must be median, hyperband or none")
    name = study or Path(source).stem
    output = data.get("output")
    out_dir = Path(output if isinstance(output, str) else (output or {}).get("dir", "runs")) / name
    data["output"] = {"dir": str(out_dir)}
    return Search(data, space, metric, direction, pruner, name, storage or f"sqlite:///{out_dir.resolve()}.db")


def _early_stopping_metric(data: dict[str, Any]) -> str | None:
    stopping = (data.get("train") or {}).get("early_stopping") or {}
    return stopping.get("metric") if isinstance(stopping, dict) else None


def _check_dimension(where: str, spec: Any) -> None:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: an empty choice; list the values to try")
        return
    if not isinstance(spec, dict) or not {"low", "high"} <= spec.keys() or set(spec) - {"low", "high", "log", "step"}:
        raise ConfigError(f"{where}: give a list of values or {{low, high, log?, step?}}")
    if not spec["low"] < spec["high"]:
        raise ConfigError(f"{where}: low must be below high")


def suggest(trial: Any, space: dict[str, Any]) -> list[str]:
    """The trial's values, as `key=value` overrides."""
    overrides = []
    for key, spec in space.items():
        if isinstance(spec, list):
            value = trial.suggest_categorical(key, spec)
        elif isinstance(spec["low"], int) and isinstance(spec["high"], int) and not spec.get("log"):
            value = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1))
        else:
            value = trial.suggest_float(key, float(spec["low"]), float(spec["high"]), log=bool(spec.get("log")))
        overrides.append(f"{key}={value}")
    return overrides


def tracked_trial(cfg: RunConfig, study: str, number: int) -> RunConfig:
    """A trial's config as MLflow should see it (when `train.report_to` lists mlflow): a run of the
    study's experiment (unless the config names one), tagged with the study and the trial number.
    TensorBoard needs nothing: each trial's run directory has its own event files."""
    if "mlflow" not in cfg.train.report_to:
        return cfg
    data = cfg.to_dict()
    mlflow = data["train"]["mlflow"]
    mlflow["experiment"] = mlflow["experiment"] or study
    mlflow["tags"] = {**mlflow["tags"], "study": study, "trial": str(number)}
    return config_from_dict(data)


def pruning_callback(trial: Any, metric: str) -> Callable[[int, dict[str, Any]], None]:
    """Report each evaluation's `metric` to the trial; stop the run when the pruner says so."""
    import optuna

    def report(step: int, record: dict[str, Any]) -> None:
        metrics = record.get("eval")
        if not metrics:
            return
        if metric not in metrics:
            raise ConfigError(f"tune.metric={metric}: the evaluation reports {sorted(metrics)}; choose one of them")
        trial.set_user_attr("steps", step)
        trial.report(float(metrics[metric]), step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {metric}={metrics[metric]:.4f}")

    return report


def make_pruner(name: str) -> Any:
    import optuna

    if name == "median":  # from the second trial on, at every evaluation
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    return optuna.pruners.HyperbandPruner() if name == "hyperband" else optuna.pruners.NopPruner()


def summarize(study: Any) -> list[dict[str, Any]]:
    return [
        {
            "number": t.number,
            "state": t.state.name.lower(),
            "value": t.value,
            "params": t.params,
            "steps": t.user_attrs.get("steps"),
            "run_dir": t.user_attrs.get("run_dir"),
        }
        for t in study.trials
    ]


def write_report(study: Any, out: Path) -> Path:
    """The study as one HTML page: best trial, all trials, importances, two plots."""
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as plots

    trials = summarize(study)
    done = [t for t in trials if t["state"] == "complete"]
    parts = [f"<h1>Study {html.escape(study.study_name)}</h1>"]
    if done:
        best = study.best_trial
        parts.append(f"<h2>Best trial: #{best.number}, value {best.value:.6g}</h2>" + _table([best.params]))
    parts.append("<h2>Trials</h2>" + _table([{**t, "params": t["params"]} for t in trials]))
    if len(done) >= 2:
        try:
            importances = optuna.importance.get_param_importances(study)
            parts.append("<h2>Parameter importances (fANOVA)</h2>" + _table([importances]))
        except (RuntimeError, ValueError) as exc:  # e.g. every trial with the same value
            parts.append(f"<p>No importances: {html.escape(str(exc))}</p>")
        for title, plot in (
            ("Optimization history", plots.plot_optimization_history),
            ("Parallel coordinates", plots.plot_parallel_coordinate),
        ):
            parts.append(f"<h2>{title}</h2>" + _png(plot(study)))
    page = "<!doctype html><html><head><meta charset='utf-8'><title>tunesmith tune</title></head><body>"
    atomic_write_text(out, page + "\n".join(parts) + "</body></html>\n")
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "<p>none</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(str(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(k)))}</td>" for k in keys) + "</tr>" for r in rows)
    return f"<table border='1' cellpadding='4'><tr>{head}</tr>{body}</table>"


def _png(axes: Any) -> str:
    import matplotlib.pyplot as plt

    figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return f"<img alt='plot' src='data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}'>"
