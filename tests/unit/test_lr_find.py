"""Learning rates: the default rule (method x model family, the new head faster), the range test of
`train.lr: auto` (its rule on hand-built curves, exact restoration of the model and RNG, the record
in plan.json and the report, resume), and config validation."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import tunesmith
from conftest import Interrupt, build_run_model, final_weights, stop_at
from tunesmith.config import config_from_dict
from tunesmith.errors import ConfigError
from tunesmith.methods import param_groups
from tunesmith.training.lr_find import (
    END_LR,
    START_LR,
    choose_lr,
    exponential_lrs,
    range_test,
    smooth,
    steepest_lr,
    step_batches,
)
from tunesmith.training.rates import HEAD_LR, head_lr_for, resolve_rates

# --- the default rule -------------------------------------------------------------------------


def test_a_conv_family_scales_the_rate_of_methods_that_tune_pretrained_weights() -> None:
    conv = resolve_rates(None, None, 5e-5, tunes_pretrained=True, family_scale=20.0)
    assert conv.lr == pytest.approx(1e-3) and conv.head_lr == HEAD_LR == 2e-3
    assert "pretrained_lr_scale 20" in conv.rule and "head at max(lr, 0.002)" in conv.rule
    transformer = resolve_rates(None, None, 5e-5, tunes_pretrained=True, family_scale=1.0)
    assert transformer.lr == 5e-5 and transformer.head_lr == HEAD_LR  # 40x: the head is not starved


def test_the_head_trains_at_least_at_the_rate_it_trains_at_alone() -> None:
    assert head_lr_for(1e-5, None, tunes_pretrained=True)[0] == HEAD_LR
    assert head_lr_for(5e-3, None, tunes_pretrained=True)[0] == 5e-3  # never below lr
    assert head_lr_for(1e-5, None, tunes_pretrained=False)[0] == 1e-5  # the head is as new as the rest
    assert head_lr_for(1e-5, 4e-4, tunes_pretrained=True)[0] == 4e-4  # configured


def test_methods_that_train_only_new_weights_keep_their_rate_on_any_family() -> None:
    for family in (1.0, 20.0):
        lora = resolve_rates(None, None, 5e-4, tunes_pretrained=False, family_scale=family)
        assert lora.lr == lora.head_lr == 5e-4


def test_configured_rates_win_and_the_multiplier_scales_both() -> None:
    given = resolve_rates(3e-4, None, 5e-5, tunes_pretrained=True, family_scale=20.0)
    assert given.lr == 3e-4 and given.head_lr == HEAD_LR  # the head still follows the rule
    both = resolve_rates(3e-4, 7e-3, 5e-5, tunes_pretrained=True, family_scale=20.0, multiplier=2.0)
    assert both.lr == pytest.approx(6e-4) and both.head_lr == pytest.approx(1.4e-2)
    found = resolve_rates("auto", None, 5e-5, tunes_pretrained=True, family_scale=20.0, found=4e-3)
    assert found.lr == 4e-3 and found.head_lr == 4e-3
    none_found = resolve_rates("auto", None, 5e-5, tunes_pretrained=True, family_scale=20.0, found=None)
    assert none_found.lr == pytest.approx(1e-3) and "never clearly fell" in none_found.rule


def test_model_families_declare_their_scale(tmp_path: Path, tiny_bert: Path) -> None:
    """The packaged conv net (built untrained here: no weights needed) against a transformer."""
    image = config_from_dict(
        {
            "model": {"name": "efficientnet-lite0", "pretrained": False},
            "task": "image-classification",
            "method": "full",
            "data": {"train": "unused"},
        }
    )
    conv, method, _ = build_run_model(image, 3)
    bert = {"model": str(tiny_bert), "method": "full", "data": {"train": "x", "max_length": 16}}
    text, _, _ = build_run_model(config_from_dict(bert), 2)
    assert conv.pretrained_lr_scale == 20.0 and text.pretrained_lr_scale == 1.0
    assert method.tunes_pretrained
    rates = resolve_rates(None, None, method.default_lr, method.tunes_pretrained, conv.pretrained_lr_scale)
    assert (rates.lr, rates.head_lr) == pytest.approx((1e-3, 2e-3))


# --- the selection rule on hand-built curves ----------------------------------------------------


def _curve(points_per_decade: int = 10) -> tuple[list[float], list[float]]:
    """Flat, then falling fastest at 1e-4, lowest at 1e-2, then blowing up: loss over log10(lr)."""
    lrs = exponential_lrs(7 * points_per_decade + 1)
    losses = []
    for lr in lrs:
        x = math.log10(lr)
        fall = 1.0 / (1.0 + math.exp(-3.0 * (x + 4.0)))  # a sigmoid centred on 1e-4: steepest there
        rise = max(0.0, x + 2.0) ** 2 * 4.0  # zero up to 1e-2, then growing fast
        losses.append(2.0 - 1.5 * fall + rise)
    return lrs, losses


def test_exponential_rates_span_the_range() -> None:
    lrs = exponential_lrs(100)
    assert lrs[0] == pytest.approx(START_LR) and lrs[-1] == pytest.approx(END_LR)
    ratios = {round(b / a, 9) for a, b in itertools.pairwise(lrs)}
    assert len(ratios) == 1  # evenly spaced on a log scale


def test_min_over_ten_picks_a_tenth_of_the_minimum() -> None:
    lrs, losses = _curve()
    best = min(range(len(losses)), key=losses.__getitem__)
    assert lrs[best] == pytest.approx(1e-2, rel=0.3)
    chosen = choose_lr(lrs, losses)
    assert chosen == pytest.approx(lrs[best] / 10)
    assert lrs[0] <= chosen <= lrs[-1]
    assert steepest_lr(lrs, losses) == pytest.approx(1e-4, rel=0.3)  # recorded beside the choice


def test_a_curve_that_never_falls_gives_no_choice() -> None:
    lrs = exponential_lrs(71)
    rising = [1.0 + 0.01 * i for i in range(len(lrs))]
    assert choose_lr(lrs, rising) is None
    noisy_start = [0.9] + [1.0] * (len(lrs) - 1)  # lowest at the first point, inside the first decade
    assert choose_lr(lrs, noisy_start) is None
    assert choose_lr([], []) is None


def test_smoothing_is_centred_and_keeps_the_minimum() -> None:
    """A centred average has no lag: a symmetric dip stays where it is under noise (a running average
    would move it to higher rates)."""
    dip = 40
    v_shape = [abs(i - dip) * 0.1 + (0.05 if i % 2 else -0.05) for i in range(81)]
    smoothed = smooth(v_shape, 2)
    assert len(smoothed) == len(v_shape)
    assert min(range(len(smoothed)), key=smoothed.__getitem__) == dip
    assert smooth([1.0, 2.0, 3.0], 1) == [1.5, 2.0, 2.5]  # shorter windows at the ends


# --- the range test leaves nothing behind -------------------------------------------------------


class _Tiny(nn.Module):
    """A backbone with a batch norm (running statistics are state too) and a new head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.2), nn.ReLU())
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _everything(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_the_range_test_restores_weights_buffers_modes_and_rng() -> None:
    model = _Tiny()
    names = [n for n, _ in model.named_parameters()] + [f"backbone.1.{b}" for b, _ in model.backbone[1].named_buffers()]
    data = torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    labels = (data[:, 0] > 0).long()

    # A real optimizer with state, as it would be in a run: the test must not touch it.
    real = torch.optim.AdamW(model.parameters(), lr=1e-3)
    nn.functional.cross_entropy(model(data), labels).backward()
    real.step()
    real.zero_grad(set_to_none=True)
    model.backbone[2].eval()  # a module in eval mode stays in eval mode
    before, optim_before = _everything(model), json.dumps(real.state_dict(), default=repr)
    modes = {n: m.training for n, m in model.named_modules()}
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    expected_rng = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)

    def step_loss(optimizer: torch.optim.Optimizer, micro: list[list[int]]) -> float:
        ids = micro[0]
        noise = torch.randn(len(ids), 4) * 0.1  # draws from the global generator, as augmentation does
        loss = nn.functional.cross_entropy(model(data[ids] + noise), labels[ids])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    groups = param_groups(model, 1.0, 0.0, 0.01)  # type: ignore[arg-type]  # the head's group apart, at 0
    head_at = lambda lr: max(lr, HEAD_LR)  # noqa: E731
    curve = range_test(model, names, groups, head_at, step_loss, step_batches([1] * 64, 8, 1, 0), 60)

    assert 0 < len(curve.lrs) <= 60 and curve.lrs == sorted(curve.lrs)
    assert curve.lrs[0] >= START_LR and curve.lrs[-1] <= END_LR
    assert len(curve.raw_losses) == len(curve.losses) == len(curve.lrs) and curve.seconds >= 0
    assert curve.stop in ("diverged", "non-finite loss", "end of range")
    after = _everything(model)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert json.dumps(real.state_dict(), default=repr) == optim_before
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected_rng


def test_the_head_follows_its_rule_through_the_sweep() -> None:
    model = _Tiny()
    names = [n for n, _ in model.named_parameters()]
    seen: list[tuple[float, float]] = []

    def step_loss(optimizer: torch.optim.Optimizer, micro: list[list[int]]) -> float:
        rates = {round(g["lr"], 12) for g in optimizer.param_groups if g["params"][0] is model.head.weight}
        body = {round(g["lr"], 12) for g in optimizer.param_groups if g["params"][0] is model.backbone[0].weight}
        seen.append((rates.pop(), body.pop()))
        return 1.0

    groups = param_groups(model, 1.0, 0.0, 0.01)  # type: ignore[arg-type]  # the head's group at 0
    range_test(model, names, groups, lambda lr: max(lr, HEAD_LR), step_loss, step_batches([1] * 16, 8, 1, 0), 20)
    assert [body for _, body in seen] == pytest.approx(exponential_lrs(20))
    assert [head for head, _ in seen] == pytest.approx([max(lr, HEAD_LR) for lr in exponential_lrs(20)])


# --- lr: auto in a run ---------------------------------------------------------------------------


def _auto(base_config: dict, **train: object) -> dict:
    return {**base_config, "method": "full", "train": {**base_config["train"], "lr": "auto", **train}}


def test_lr_auto_trains_exactly_as_the_rate_it_chose(base_config: dict, tmp_path: Path) -> None:
    """The range test leaves no trace: a run at `lr: auto` ends with the weights of a run configured with
    the rate it chose (same seed, same data), and plan.json and the report show the test."""
    cfg = _auto(base_config, lr_find_steps=30)
    auto = tunesmith.train(**cfg)
    plan = json.loads((auto.run_dir / "plan.json").read_text())
    finder = plan["lr_finder"]
    assert {"lrs", "losses", "raw_losses", "chosen", "rule", "seconds", "stop", "steepest"} <= finder.keys()
    assert len(finder["lrs"]) == len(finder["losses"]) > 0 and finder["rule"].startswith("min/10")
    chosen = finder["chosen"]
    assert chosen is not None and START_LR <= chosen <= END_LR
    assert chosen == pytest.approx(choose_lr(finder["lrs"], finder["losses"]))
    assert plan["lr"] == chosen and plan["head_lr"] == max(chosen, HEAD_LR)
    assert "range test" in plan["lr_rule"]

    fixed = tunesmith.train(**{**cfg, "train": {**cfg["train"], "lr": chosen}, "output": str(tmp_path / "fixed")})
    expected, got = final_weights(fixed.run_dir), final_weights(auto.run_dir)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    report = (auto.run_dir / "report.html").read_text()
    start = report.index("<h2 id='lr_finder'>Learning-rate range test</h2>")
    shown = report[start : report.index("<h2 id='training'>")]
    assert shown.count('<img src="data:image/png;base64,') == 1 and "min/10" in shown and f"{chosen:.4g}" in shown
    logged = [json.loads(line) for line in (auto.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["chosen"] for r in logged if r["kind"] == "lr_finder"] == [chosen]


def test_lr_auto_runs_on_cached_features(base_config: dict) -> None:
    """Feature extraction caches the frozen backbone's output: the test steps through the head alone."""
    cfg = {**_auto(base_config, lr_find_steps=20), "method": "feature-extraction"}
    result = tunesmith.train(**cfg)
    plan = json.loads((result.run_dir / "plan.json").read_text())
    assert len(plan["lr_finder"]["lrs"]) > 0
    assert plan["head_lr"] == plan["lr"]  # feature extraction: the head is all that trains


def test_resume_reuses_the_recorded_choice(base_config: dict, tmp_path: Path) -> None:
    cfg = _auto(base_config, lr_find_steps=30, save_every=2)
    with pytest.raises(Interrupt):
        tunesmith.train(**{**cfg, "output": str(tmp_path / "broken")}, callbacks=[stop_at(5)])
    (broken,) = (tmp_path / "broken").iterdir()
    recorded = json.loads((broken / "plan.json").read_text())["lr_finder"]
    resumed = tunesmith.train(broken / "config.yaml", resume=broken)
    plan = json.loads((resumed.run_dir / "plan.json").read_text())
    assert plan["lr_finder"] == recorded and plan["lr"] == recorded["chosen"]
    logged = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "lr_finder" for r in logged) == 1  # not run again
    whole = tunesmith.train(**{**cfg, "output": str(tmp_path / "whole")})
    expected, got = final_weights(whole.run_dir), final_weights(resumed.run_dir)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def test_resume_without_a_record_is_refused(base_config: dict, tmp_path: Path) -> None:
    cfg = _auto(base_config, lr_find_steps=20, save_every=2)
    with pytest.raises(Interrupt):
        tunesmith.train(**cfg, callbacks=[stop_at(3)])
    (broken,) = Path(cfg["output"]).iterdir()
    plan = json.loads((broken / "plan.json").read_text())
    del plan["lr_finder"]
    (broken / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ConfigError, match="no lr_finder record"):
        tunesmith.train(broken / "config.yaml", resume=broken)


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"lr": "fast"}, "train.lr: 'fast' is not a learning rate; give a number (e.g. 5.0e-5), or auto"),
        ({"lr": 0}, "train.lr: must be greater than 0 and finite (got 0), or auto"),
        ({"lr": True}, "train.lr: True is not a learning rate"),
        ({"head_lr": "auto"}, "train.head_lr: auto is for train.lr; leave head_lr unset"),
        ({"head_lr": "quick"}, "train.head_lr: 'quick' is not a learning rate; give a number (e.g. 5.0e-5)\n"),
        ({"lr_find_steps": 5}, "train.lr_find_steps: must be greater than or equal to 10"),
    ],
)
def test_bad_rates_are_refused_by_name(train: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": "m", "method": "full", "data": {"train": "x"}, "train": train})
    assert message in str(info.value) + "\n"


def test_rates_spelled_as_yaml_strings_are_numbers() -> None:
    cfg = config_from_dict({"model": "m", "method": "full", "data": {"train": "x"}, "train": {"lr": "5e-5"}})
    assert cfg.train.lr == 5e-5
    auto = config_from_dict({"model": "m", "method": "full", "data": {"train": "x"}, "train": {"lr": "auto"}})
    assert auto.train.lr == "auto"
