"""Hyperparameter search: trials are runs, a trial behind the median at an evaluation stops there,
the study persists in SQLite, and its report is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import tunesmith.api as api
from tunesmith.errors import ConfigError


def search_config(base_config: dict, tmp_path: Path, search: dict, tune: dict | None = None) -> Path:
    config = {**base_config, "train": {**base_config["train"], "eval_every": 3, "epochs": 2}}
    config["search"] = search
    if tune:
        config["tune"] = tune
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_a_study_prunes_the_trial_that_falls_behind(base_config: dict, tmp_path: Path) -> None:
    # lr 5e-3 learns; 1e-7 does not move: at its first evaluation its loss is above the median of the
    # finished trial's at that step, so it stops there.
    path = search_config(base_config, tmp_path, {"train.lr": [5e-3, 1e-7]}, {"metric": "loss"})
    import optuna

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="study", storage=storage, direction="minimize")
    for lr in (5e-3, 1e-7, 5e-3):
        study.enqueue_trial({"train.lr": lr})
    result = api.tune(path, trials=3, storage=storage)
    states = [t["state"] for t in result.trials]
    assert states == ["complete", "pruned", "complete"]
    finished, pruned = result.trials[0], result.trials[1]
    assert pruned["steps"] < finished["steps"]  # stopped early
    assert Path(pruned["run_dir"]).is_dir() and Path(finished["run_dir"], "eval.json").is_file()
    assert result.best["params"] == {"train.lr": 5e-3}
    again = api.tune(path, trials=1, storage=storage)  # the study continues where it was
    assert len(again.trials) == 4
    report = api.tune_report(path, storage)
    text = report.read_text()
    assert "Best trial" in text and "Parameter importances" in text and text.count("data:image/png") == 2


def test_search_sections_are_checked(base_config: dict, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="search.train.lr: low must be below high"):
        api.tune(search_config(base_config, tmp_path, {"train.lr": {"low": 1, "high": 0.1}}), trials=1)
    with pytest.raises(ConfigError, match="tune.pruner='fast'"):
        api.tune(search_config(base_config, tmp_path, {"train.lr": [1e-3]}, {"pruner": "fast"}), trials=1)
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(base_config))
    with pytest.raises(ConfigError, match="no search section"):
        api.tune(plain, trials=1)
    with pytest.raises(ConfigError, match="tune.metric=bleu"):
        api.tune(search_config(base_config, tmp_path, {"train.lr": [1e-3]}, {"metric": "bleu"}), trials=1)
