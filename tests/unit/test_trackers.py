"""Experiment trackers: what a run reports to TensorBoard and MLflow, read back with the libraries' own
readers (EventAccumulator, MlflowClient) and checked against the run's metrics.jsonl and eval.json."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import tunesmith.api as api
from conftest import Interrupt, stop_at
from tunesmith.config import load_config
from tunesmith.errors import ConfigError
from tunesmith.trackers import build_trackers
from tunesmith.trackers.base import final_scalars, retention_scalars, step_scalars


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables made: made once (MLflow's migrations take seconds), copied
    where each test's runs expect theirs."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments(max_results=1)
    return db


def store_at(template: Path, directory: Path) -> str:
    """The store copied to `directory/mlflow.db` (where a run whose output.dir is `directory` looks by
    default); its tracking URI."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copy(template, directory / "mlflow.db")
    return f"sqlite:///{directory / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def logged(run_dir: Path) -> tuple[dict[int, float], dict[int, dict]]:
    """metrics.jsonl's training loss by step and evaluation metrics by step (the last line per step)."""
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in lines if r["kind"] == "train"}
    evals = {r["step"]: r["metrics"] for r in lines if r["kind"] == "eval"}
    return losses, evals


def scalars(log_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(tag)}


def history(mlflow, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in mlflow.get_metric_history(run_id, key))


def artifact_paths(mlflow, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in mlflow.list_artifacts(run_id, path):
        found |= artifact_paths(mlflow, run_id, item.path) if item.is_dir else {item.path}
    return found


def test_a_run_reports_every_logged_number_to_tensorboard_and_mlflow(
    base_config: dict, sentiment_file: Path, tmp_path: Path, mlflow_store: Path
) -> None:
    uri = store_at(mlflow_store, tmp_path / "runs")  # output.dir: the default store's place
    train = {**base_config["train"], "report_to": ["tensorboard", "mlflow"]}
    retention = {"data": str(sentiment_file), "metric": "accuracy", "max_rows": 16}
    result = api.train({**base_config, "train": train, "eval": {"retention": retention}})
    run_dir, final = result.run_dir, result.metrics
    losses, evals = logged(run_dir)
    assert len(losses) == 9 and sorted(evals) == [9, 18]
    retained = {r["step"]: r["value"] for r in final["retention"]["history"]}
    assert sorted(retained) == [0, 9, 18]

    # TensorBoard: what metrics.jsonl holds, at the same steps (event files keep float32).
    board = run_dir / "tensorboard"
    assert scalars(board, "train/loss") == pytest.approx(losses, rel=1e-6)
    assert scalars(board, "eval/accuracy") == pytest.approx({s: m["accuracy"] for s, m in evals.items()})
    assert scalars(board, "retention/value") == pytest.approx(retained)
    assert scalars(board, "final/validation/accuracy") == pytest.approx({18: final["validation"]["accuracy"]})
    assert hparam(board, "train.lr") == pytest.approx(5e-3) and hparam(board, "train.log_every") == 2

    # MLflow: a finished run of experiment <task>-<method> in <output.dir>/mlflow.db.
    mlflow = client(uri)
    experiment = mlflow.get_experiment_by_name("classification-lora")
    (run,) = mlflow.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert json.loads((run_dir / "mlflow-run.json").read_text())["run_id"] == run.info.run_id
    params = run.data.params
    assert params["train.lr"] == "0.005" and params["model.name"] == base_config["model"]
    assert params["train.report_to"] == '["tensorboard", "mlflow"]' and params["eval.retention.max_rows"] == "16"
    assert history(mlflow, run.info.run_id, "train/loss") == sorted(losses.items())
    assert history(mlflow, run.info.run_id, "eval/macro_f1") == [(s, m["macro_f1"]) for s, m in evals.items()]
    assert history(mlflow, run.info.run_id, "retention/change")[0] == (0, 0.0)
    assert run.data.metrics["final/validation/loss"] == final["validation"]["loss"]
    assert run.data.metrics["final/train/steps"] == 18
    files = artifact_paths(mlflow, run.info.run_id)
    assert {"config.yaml", "eval.json", "metrics.jsonl", "report.html", "final/trainable.safetensors"} <= files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    assert not any(f.startswith("checkpoints") for f in files)
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").as_uri())


def hparam(log_dir: Path, key: str) -> float | str:
    """A hyperparameter of the run as TensorBoard's HParams dashboard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    events = EventAccumulator(str(log_dir))
    events.Reload()
    data = HParamsPluginData.FromString(events.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    value = data.session_start_info.hparams[key]
    return value.number_value if value.HasField("number_value") else value.string_value


def test_an_interrupted_run_is_failed_in_mlflow_and_its_resume_continues_it(
    base_config: dict, tmp_path: Path, mlflow_store: Path
) -> None:
    uri = store_at(mlflow_store, tmp_path / "store")
    train = {**base_config["train"], "save_every": 4, "report_to": ["tensorboard", "mlflow"]}
    train["mlflow"] = {"tracking_uri": uri, "experiment": "resumed", "max_artifact_mb": 0.02}
    with pytest.raises(Interrupt):
        api.train({**base_config, "train": train}, callbacks=[stop_at(6)])
    (run_dir,) = (tmp_path / "runs").iterdir()
    mlflow = client(uri)
    (failed,) = mlflow.search_runs([mlflow.get_experiment_by_name("resumed").experiment_id])
    assert failed.info.status == "FAILED" and failed.data.tags["error"].startswith("Interrupt")
    assert [s for s, _ in history(mlflow, failed.info.run_id, "train/loss")] == [2, 4, 6]

    api.train(run_dir / "config.yaml", resume=run_dir)  # from the checkpoint at step 4
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("resumed").experiment_id])
    assert run.info.run_id == failed.info.run_id and run.info.status == "FINISHED"
    losses, _ = logged(run_dir)  # step 6 twice in metrics.jsonl; the resumed run's value last
    assert scalars(run_dir / "tensorboard", "train/loss") == pytest.approx(losses, rel=1e-6)  # purged, not doubled
    # 20 KiB: the LoRA weights (32 KiB) and report.html stay out, and the run says which.
    assert "final/trainable.safetensors" in run.data.tags["artifacts_left_out"]
    files = artifact_paths(mlflow, run.info.run_id)
    assert "config.yaml" in files and "final/trainable.safetensors" not in files


def test_each_trial_of_a_study_is_its_own_mlflow_run(base_config: dict, tmp_path: Path, mlflow_store: Path) -> None:
    config = {**base_config, "train": {**base_config["train"], "report_to": ["mlflow", "tensorboard"]}}
    config |= {"search": {"train.lr": [5e-3, 1e-3]}, "tune": {"pruner": "none"}}
    path = tmp_path / "study.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    uri = store_at(mlflow_store, tmp_path / "runs" / "study")  # a study's runs go to output.dir/<study>
    result = api.tune(path, trials=2, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    mlflow = client(uri)
    runs = mlflow.search_runs([mlflow.get_experiment_by_name("study").experiment_id], order_by=["tags.trial"])
    assert [(r.data.tags["study"], r.data.tags["trial"]) for r in runs] == [("study", "0"), ("study", "1")]
    assert [r.data.params["train.lr"] for r in runs] == [str(t["params"]["train.lr"]) for t in result.trials]
    run_dirs = [Path(t["run_dir"]) for t in result.trials]
    assert [r.info.run_name for r in runs] == [d.name for d in run_dirs]
    for run_dir in run_dirs:
        assert len(scalars(run_dir / "tensorboard", "train/loss")) == 9  # each trial's own curves


def test_report_to_names_known_trackers() -> None:
    minimal = {"model": "m", "data": {"train": "t.jsonl"}}
    with pytest.raises(ConfigError, match=r"train.report_to.1: must be 'tensorboard' or 'mlflow' \(got 'wandb'\)"):
        load_config({**minimal, "train": {"report_to": ["tensorboard", "wandb"]}})
    assert load_config(minimal, ["train.report_to=mlflow"]).train.report_to == ["mlflow"]
    assert load_config(minimal).train.report_to == []


@pytest.mark.parametrize(("tracker", "package"), [("mlflow", "mlflow-skinny"), ("tensorboard", "tensorboard")])
def test_a_tracker_not_installed_is_named_with_its_pip_command(
    base_config: dict, monkeypatch: pytest.MonkeyPatch, tracker: str, package: str
) -> None:
    monkeypatch.setitem(sys.modules, tracker, None)  # what an environment without it imports
    train = {**base_config["train"], "report_to": [tracker]}
    with pytest.raises(ConfigError, match=f"train.report_to: {tracker} needs .* pip install {package}"):
        api.train({**base_config, "train": train})


def test_an_unusable_tracking_uri_is_named(base_config: dict, tmp_path: Path) -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]  # closed again: nothing answers there
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for uri, reason in [
        (f"http://127.0.0.1:{port}", "no answer"),
        (f"sqlite:///{blocked}/mlflow.db", "MLflow cannot use it"),
    ]:
        train = {**base_config["train"], "report_to": ["mlflow"], "mlflow": {"tracking_uri": uri}}
        trackers = build_trackers(load_config({**base_config, "train": train}))
        refused = pytest.raises(ConfigError, match=f"train.mlflow.tracking_uri={uri}: {reason}")
        with refused, trackers.active(tmp_path, {}):
            pass


def test_tracked_names_are_the_numbers_of_a_record() -> None:
    record = {
        "step": 4,
        "epoch": 0.5,
        "loss": 0.7,
        "lr": 1e-3,
        "kl": 0.1,
        "eval": {"accuracy": 0.5, "stopped": True, "f1_per_class": {"très bon!": 0.4}, "confusion": {"matrix": [[1]]}},
    }
    assert step_scalars(record) == {
        "train/loss": 0.7,
        "train/lr": 1e-3,
        "train/kl": 0.1,
        "train/epoch": 0.5,
        "eval/accuracy": 0.5,
        "eval/f1_per_class/très bon_": 0.4,
    }
    assert step_scalars({"step": 3, "epoch": 0.4}) == {}  # neither logged nor evaluated
    history = [{"step": 0, "metric": "accuracy", "value": 0.5, "baseline": 0.5, "change": 0.0, "within_bound": True}]
    metrics = {"validation": {"accuracy": 0.75}, "retention": {"value": 0.5, "history": history}}
    assert final_scalars(metrics) == {"final/validation/accuracy": 0.75, "final/retention/value": 0.5}
    assert retention_scalars(metrics) == [
        (0, {"retention/value": 0.5, "retention/baseline": 0.5, "retention/change": 0.0})
    ]


def test_importing_tunesmith_loads_no_tracker_library() -> None:
    loaded = "sorted({m.split('.')[0] for m in sys.modules} & {'mlflow', 'tensorboard'})"
    code = f"import sys, tunesmith.api; print({loaded})"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip() == "[]"
