"""`tunesmith plan`: parameter counts as the run builds them, an estimate checked against a hand
computation and against the measured dry run, a dry run that leaves no run behind, and a memory
warning that names the settings that apply, with exit status 1."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

import tunesmith.api as api
from conftest import build_run_model, run_cli, sentiment_rows, write_jsonl
from tunesmith import preflight, runs
from tunesmith.config import load_config
from tunesmith.training.estimate import kept, row_costs
from tunesmith.training.shapes import probe_row


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_counts_are_the_models_own(base_config: dict) -> None:
    for method in ("lora", "full", "feature-extraction"):
        config = {**base_config, "method": method}
        report = api.plan(config, dry_run=False)
        model, _, names = build_run_model(load_config(config), num_labels=2)
        trainable = sum(p.numel() for n, p in model.named_parameters() if n in set(names))
        assert report["parameters"] == {"total": sum(p.numel() for p in model.parameters()), "trainable": trainable}
        assert report["measured"] is None and report["error"] is None


def test_the_dry_run_measures_three_steps_and_leaves_no_run(
    base_config: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where the temporary run goes
    opened: list[Path] = []

    def open_and_note(*args: Any) -> Any:
        run = runs.open_or_create(*args)
        opened.append(run.dir)
        return run

    monkeypatch.setattr(preflight, "open_or_create", open_and_note)
    report = api.plan(base_config)
    (dry_run,) = opened
    assert dry_run.is_relative_to(scratch) and not dry_run.exists()
    assert not Path(base_config["output"]).exists()  # output.dir got no run
    assert list(scratch.iterdir()) == []  # and the temporary run is gone
    measured = report["measured"]
    assert len(measured["steps_seconds"]) == 3 and measured["step_seconds"] > 0
    assert measured["eval_batch_seconds"] > 0 and measured["peak_rss_mb"] > measured["training_mb"] > 0
    # 96 rows, a quarter held out: 72 rows of 8 a step, 2 epochs
    assert report["steps"] == 18
    projected = report["projected"]
    assert projected["basis"] == "measured"
    expected = measured["first_step_seconds"] + 17 * measured["step_seconds"]
    assert projected["train_seconds"] == pytest.approx(expected, abs=0.1)
    assert projected["evaluation_passes"] == 3  # one each epoch, one after training


def sft_config(tiny_llama: Path, tmp_path: Path, method: str) -> dict:
    rows = [{"prompt": r["text"], "completion": r["label"]} for r in sentiment_rows(48)]
    return {
        "model": str(tiny_llama),
        "task": "sft",
        "method": method,
        "data": {"train": str(write_jsonl(tmp_path / "sft.jsonl", rows)), "validation": 0.25, "max_length": 64},
        "train": {"epochs": 1, "batch_size": 4, "precision": "fp32"},
        "output": str(tmp_path / "runs"),
    }


@pytest.mark.parametrize("case", ["bert-full", "bert-lora", "bert-adapter", "llama-sft-lora", "llama-sft-full"])
def test_the_activation_estimate_is_near_the_saved_tensors(
    case: str, base_config: dict, tiny_llama: Path, tmp_path: Path
) -> None:
    # What the forward pass keeps for backward, estimated from shapes, against what autograd saved on
    # the same micro-batch: the part of the estimate that RSS cannot show on a model this small.
    model, *_, method = case.split("-")
    config = {**base_config, "method": method} if model == "bert" else sft_config(tiny_llama, tmp_path, method)
    report = api.plan(config)
    # 0.88 to 1.32 on these five with eager attention; the tiny Llama under sdpa (what the kernel
    # probe picks on some CPUs) measures 0.72-0.76: its fused attention keeps more than q, k, v,
    # the mask and its outputs, which the estimate counts (not yet traced further)
    assert 0.7 <= report["error"]["activations"] <= 1.35
    assert report["measured"]["activations_mb"] > 0.3


def test_a_frozen_backbone_keeps_activations_for_its_head_alone(base_config: dict) -> None:
    head = api.plan({**base_config, "method": "feature-extraction"}, dry_run=False)["estimate"]
    lora = api.plan({**base_config, "method": "lora"}, dry_run=False)["estimate"]
    # the head keeps its pooled input: 8 rows x 32 features x 4 bytes
    assert head["memory_mb"]["activations"] * 2**20 < 8 * 32 * 4 * 2
    assert lora["memory_mb"]["activations"] > 100 * head["memory_mb"]["activations"]
    assert head["frozen_work_cached"] and not lora["frozen_work_cached"]
    assert head["step_seconds"] < lora["step_seconds"] / 10  # cached: the backbone runs once, not each step


class TwoLayers(nn.Module):
    """A frozen linear, a ReLU, then a linear that trains."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen, self.act, self.head = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.frozen(x)))


def test_costs_of_a_small_network_by_hand() -> None:
    import contextlib

    model = TwoLayers()
    long = probe_row(model, {"x": torch.zeros(1, 10, 8)}, contextlib.nullcontext, 10)
    short = probe_row(model, {"x": torch.zeros(1, 5, 8)}, contextlib.nullcontext, 5)
    calls = {c.name: c for c in long.calls}
    assert calls["frozen"].flops == 2 * 10 * 8 * 16 and calls["head"].flops == 2 * 10 * 16 * 4
    assert not calls["frozen"].grad_in and calls["head"].trains and not calls["head"].grad_in
    assert [t.nbytes for t in kept(calls["head"])] == [10 * 16 * 4]  # its input, for its weight gradient
    costs = row_costs(long, short, cached=False, checkpointing=False)
    # Only the head keeps anything (nothing before it trains); per step the frozen layer runs
    # forward once and the head forward plus its weight gradient (no input gradient: 2x).
    assert costs.activations == (10 * 16 * 4, 5 * 16 * 4)
    assert costs.flops == (2 * 10 * 8 * 16 + 2 * (2 * 10 * 16 * 4), 2 * 5 * 8 * 16 + 2 * (2 * 5 * 16 * 4))
    assert costs.at(costs.activations, 20) == 20 * 16 * 4  # linear in the length
    cached = row_costs(long, short, cached=True, checkpointing=False)
    assert cached.flops[0] == 2 * (2 * 10 * 16 * 4)  # the frozen layer's output comes from the cache


def test_levers_apply_to_the_method_and_come_largest_first(base_config: dict) -> None:
    def settings(method: str) -> list[str]:
        report = api.plan({**base_config, "method": method}, memory_limit_gb=1e-4, dry_run=False)
        assert not report["memory"]["fits"]
        saves = [lever["saves_mb"] for lever in report["levers"]]
        assert saves == sorted(saves, reverse=True)
        return [lever["setting"].split("=")[0] for lever in report["levers"]]

    full = settings("full")
    assert set(full) == {"train.batch_size", "train.gradient_checkpointing", "data.max_length", "method.name"}
    assert set(settings("lora")) == {"train.batch_size", "train.gradient_checkpointing", "data.max_length"}
    # feature extraction: no block on the gradient path to checkpoint, few weights train
    assert "train.gradient_checkpointing" not in settings("feature-extraction")
    assert "method.name" not in settings("feature-extraction")


def test_cli_warns_names_the_levers_and_exits_1(base_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, {**base_config, "method": "full"})
    result = run_cli(monkeypatch, capsys, "plan", config, "--memory-limit", "0.0001")
    assert result.code == 1
    assert "warning: the run needs" in result.text
    for setting in ("train.batch_size=4 train.grad_accum=2", "train.gradient_checkpointing=true", "method.name=lora"):
        assert setting in result.text
    assert "step time" in result.out and "projected run (measured)" in result.text
    assert (
        "gradient checkpointing (auto): off, the estimated peak fits" in result.out
    )  # auto decides on what is available
    assert not Path(base_config["output"]).exists()


def test_cli_json_parses_and_fits(base_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    result = run_cli(monkeypatch, capsys, "plan", config, "--json", "--estimate-only", "train.batch_size=4")
    assert result.code == 0
    report = json.loads(result.out)
    assert report["memory"]["fits"] and "levers" not in report
    assert report["estimate"]["batch"]["rows"] == 4
    assert report["method"] == "lora" and report["parameters"]["trainable"] > 0


def test_cli_bad_config_is_one_line_and_exit_2(base_config: dict, tmp_path: Path, monkeypatch, capsys) -> None:
    config = write_config(tmp_path, base_config)
    result = run_cli(monkeypatch, capsys, "plan", config, "train.batch_sise=4")
    assert result.code == 2
    assert "error:" in result.err and "batch_sise" in result.err and "Traceback" not in result.err


def _room(monkeypatch: pytest.MonkeyPatch, available_mb: float) -> None:
    """The machine as having `available_mb` for the run, and nothing held besides training."""
    monkeypatch.setattr(preflight, "_memory_room", lambda model, runtime: (0, int(available_mb * 2**20)))


def test_auto_checkpointing_turns_on_when_the_estimate_presses_and_the_run_records_why(
    base_config: dict, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    enabled: list[Any] = []
    real = api.enable_checkpointing
    monkeypatch.setattr(api, "enable_checkpointing", lambda model, method: (enabled.append(model), real(model, method)))
    _room(monkeypatch, available_mb=0.5)  # less than the tiny model's estimate
    result = api.train({**base_config, "train": {**base_config["train"], "max_steps": 2}})
    decision = json.loads((result.run_dir / "plan.json").read_text())["gradient_checkpointing"]
    assert decision["on"] is True and decision["setting"] == "auto"
    assert decision["estimated_peak_mb"] > 0.8 * decision["available_mb"] == 0.4
    assert decision["estimated_peak_checkpointed_mb"] < decision["estimated_peak_mb"]
    (model,) = enabled
    assert model.backbone.base_model.model.is_gradient_checkpointing  # the encoder under peft's LoRA wrapper
    assert "auto turned it on" in capsys.readouterr().err


def test_auto_checkpointing_stays_off_with_room_and_a_fixed_setting_is_not_probed(
    base_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    _room(monkeypatch, available_mb=1e6)
    short = {**base_config["train"], "max_steps": 1}
    result = api.train({**base_config, "train": short})
    decision = json.loads((result.run_dir / "plan.json").read_text())["gradient_checkpointing"]
    assert decision["on"] is False and "fits" in decision["reason"]
    monkeypatch.setattr(preflight, "checkpointing_decision", lambda *a: pytest.fail("a fixed setting is not probed"))
    fixed = api.train({**base_config, "train": {**short, "gradient_checkpointing": False}})
    assert "gradient_checkpointing" not in json.loads((fixed.run_dir / "plan.json").read_text())


def test_a_resumed_run_keeps_the_recorded_decision_without_probing(
    base_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(base_config)
    data = api._read_data(cfg)
    model, names, runtime = api._build_run_model(cfg, data)
    monkeypatch.setattr(preflight, "checkpointing_decision", lambda *a: pytest.fail("the decision was recorded"))
    recorded = {
        "gradient_checkpointing": {"setting": "auto", "on": True, "estimated_peak_mb": 9.0, "available_mb": 10.0}
    }
    assert api._auto_checkpointing(cfg, data, model, names, runtime, [], recorded, None)["on"] is True
    assert model.backbone.base_model.model.is_gradient_checkpointing


def test_auto_checkpointing_names_why_it_cannot_apply(base_config: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunesmith.build import checkpointing_unavailable

    _room(monkeypatch, available_mb=0.5)
    cfg = load_config({**base_config, "method": "prefix-tuning"})
    data = api._read_data(cfg)
    model, names, runtime = api._build_run_model(cfg, data)
    decision = preflight.checkpointing_decision(cfg, data.method, data.objective, model, names, runtime, [])
    assert decision == {
        "setting": "auto",
        "on": False,
        "reason": f"method.name=prefix-tuning: {data.method.checkpointing_refusal}",
    }

    cfg = load_config({**base_config, "method": "feature-extraction"})  # nothing to recompute, no probe
    data = api._read_data(cfg)
    model, names, runtime = api._build_run_model(cfg, data)
    monkeypatch.setattr(preflight, "_row_costs", lambda *a, **k: pytest.fail("a frozen backbone is not probed"))
    decision = preflight.checkpointing_decision(cfg, data.method, data.objective, model, names, runtime, [])
    assert decision["on"] is False and "backbone is frozen" in decision["reason"]
    monkeypatch.undo()
    _room(monkeypatch, available_mb=0.5)

    class Sampling:  # an objective whose batches are sampled as it trains (RL)
        samples_while_training = True

    cfg = load_config(base_config)
    data = api._read_data(cfg)
    model, names, runtime = api._build_run_model(cfg, data)
    decision = preflight.checkpointing_decision(cfg, data.method, Sampling(), model, names, runtime, [])
    assert decision["on"] is False and "sampled as the run trains" in decision["reason"]
    assert checkpointing_unavailable(nn.Sequential(nn.Linear(2, 2)), data.method) == "Sequential does not support it"


def test_the_plan_shows_the_run_as_auto_checkpointing_will_train_it(
    base_config: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    roomy = api.plan(base_config, dry_run=False)
    assert roomy["gradient_checkpointing"]["on"] is False
    _room(monkeypatch, available_mb=0.5)
    pressed = api.plan(base_config, dry_run=False)
    assert pressed["gradient_checkpointing"]["on"] is True
    assert pressed["estimate"]["memory_mb"]["activations"] < roomy["estimate"]["memory_mb"]["activations"]
    assert not any(lever["setting"] == "train.gradient_checkpointing=true" for lever in pressed.get("levers", []))


@pytest.mark.parametrize("value", ["maybe", 2, [True]])
def test_a_bad_checkpointing_setting_is_refused_in_one_line(value: object) -> None:
    from tunesmith.config import config_from_dict
    from tunesmith.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": "m", "data": {"train": "x"}, "train": {"gradient_checkpointing": value}})
    assert str(info.value).splitlines()[1:] == [f"  train.gradient_checkpointing: {value!r}: give auto, true or false"]
    for spelled, meant in (("auto", "auto"), ("on", True), ("False", False), (True, True)):
        train = config_from_dict({"model": "m", "data": {"train": "x"}, "train": {"gradient_checkpointing": spelled}})
        assert train.train.gradient_checkpointing == meant
