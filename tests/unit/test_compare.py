"""`tunesmith compare`: variants, summaries (mean and spread over seeds) and the written tables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tunesmith import cli
from tunesmith.compare import Outcome, Variant, plan_variants, summarize, to_markdown
from tunesmith.errors import ConfigError


def test_variants_for_methods_and_for_shots_by_seeds() -> None:
    by_method = plan_variants(["full", "lora"], None, 3)
    assert [v.label for v in by_method] == ["full", "lora"]
    assert "train.lr=null" in by_method[0].overrides  # each method at its own default rate
    by_shots = plan_variants(None, [8, 32], 3)
    assert len(by_shots) == 6 and {v.group for v in by_shots} == {"8 per label", "32 per label"}
    assert "data.few_shot=32" in by_shots[-1].overrides and "train.seed=2" in by_shots[-1].overrides
    with pytest.raises(ConfigError):
        plan_variants(["lora"], [8], 3)


def _outcome(group: str, accuracy: float, change: float | None = None) -> Outcome:
    metrics = {
        "validation": {"accuracy": accuracy, "macro_f1": accuracy - 0.1},
        "train": {"trainable_parameters": 10, "wall_seconds": 2.0, "peak_rss_mb": 100.0},
    }
    if change is not None:
        metrics["retention"] = {"change": change}
    return Outcome(Variant(group, (), group), Path("/runs") / group, metrics)


def test_summary_reports_mean_and_spread_over_seeds() -> None:
    rows = summarize([_outcome("8", 0.6), _outcome("8", 0.8), _outcome("32", 0.9, 0.05)], "classification")
    eight, many = rows
    assert eight["runs"] == 2 and eight["accuracy"] == pytest.approx(0.7)
    assert eight["accuracy_std"] == pytest.approx(0.1414213, abs=1e-6)
    assert many["retention_change"] == 0.05
    table = to_markdown(rows, "classification", "x.yaml")
    assert "0.7000 ± 0.1414" in table and "+5.0%" in table


def test_an_override_of_the_rate_holds_for_every_method() -> None:
    from tunesmith.compare import _variant_overrides

    (full,) = plan_variants(["full"], None, 1)
    assert _variant_overrides(full, ["data.limit=10"])[-1] == "train.lr=null"  # each method at its default
    kept = _variant_overrides(full, ["train.lr=auto"])
    assert "train.lr=auto" in kept and "train.lr=null" not in kept and "method.name=full" in kept


def test_the_table_shows_held_out_loss_and_the_rates() -> None:
    auto = _outcome("full", 0.9)
    auto.metrics["validation"]["loss"] = 0.25
    auto.plan = {"lr": 1e-3, "head_lr": 1e-2}
    same = _outcome("lora", 0.8)
    same.plan = {"lr": 5e-4, "head_lr": 5e-4}
    rows = summarize([auto, same], "classification")
    assert rows[0]["loss"] == 0.25 and "loss" not in rows[1]
    table = to_markdown(rows, "classification", "x.yaml")
    assert "| variant | accuracy | macro_f1 | loss | lr (head) |" in table
    assert "| full | 0.9000 | 0.8000 | 0.2500 | 0.001 (0.01) |" in table
    assert "| lora | 0.8000 | 0.7000 | - | 0.0005 |" in table


def test_compare_methods_through_the_cli(base_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    base_config["train"]["max_steps"] = 2
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(base_config))
    out = tmp_path / "cmp"
    monkeypatch.setattr(
        sys,
        "argv",
        ["tunesmith", "compare", str(config), "--methods", "lora,nope,feature-extraction", "--out", str(out)],
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "| lora |" in printed and "| feature-extraction |" in printed and "failed" in printed
    (folder,) = out.iterdir()
    rows = json.loads((folder / "compare.json").read_text())
    assert [r["variant"] for r in rows] == ["lora", "nope", "feature-extraction"]
    assert rows[0]["trainable_parameters"] > rows[2]["trainable_parameters"]
    assert rows[1]["failed"] == 1 and "nope" in rows[1]["error"]
    assert "<table>" in (folder / "compare.html").read_text()


def test_every_task_has_headline_metrics() -> None:
    """A task without its compare columns would fail only at the end of a compare."""
    from tunesmith import registry
    from tunesmith.compare import headline

    for name in registry.tasks():
        assert headline(name), name
