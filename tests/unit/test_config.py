"""Config: YAML + overrides, unknown keys with hints, every error at once, shipped configs valid."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.config import RunConfig, load_config, read_yaml_config
from tunesmith.errors import ConfigError
from tunesmith.search import read_search

CONFIGS = sorted((Path(__file__).parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path: Path) -> None:
    if "search" in read_yaml_config(path):  # a `tunesmith tune` config: a run config plus its search
        search = read_search(path, [], storage="sqlite://", study=None)
        assert isinstance(load_config(search.base), RunConfig)
        for key, spec in search.space.items():  # every key names a setting, every end of it is valid
            for value in spec if isinstance(spec, list) else (spec["low"], spec["high"]):
                assert isinstance(load_config(search.base, [f"{key}={value}"]), RunConfig)
        return
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


def test_there_are_shipped_configs() -> None:
    assert len(CONFIGS) >= 3


def test_shorthands_and_overrides() -> None:
    cfg = load_config(
        {"model": "minilm-l6", "method": "lora", "data": {"train": "x.jsonl"}},
        ["method.r=16", "train.lr=1e-4", "data.validation=x.jsonl", "output=elsewhere"],
    )
    assert cfg.model.name == "minilm-l6"
    assert cfg.method.name == "lora" and cfg.method.r == 16
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.data.validation == "x.jsonl"
    assert cfg.output.dir == "elsewhere"


def test_override_switches_method_and_keeps_defaults_in_the_schema() -> None:
    cfg = load_config({"model": "m", "data": {"train": "x"}}, ["method.name=adapter", "method.bottleneck=16"])
    assert cfg.method.name == "adapter" and cfg.method.bottleneck == 16
    assert cfg.train.batch_size == 32  # the schema's default


def test_all_errors_reported_at_once_with_paths_and_hints() -> None:
    bad = {
        "model": "minilm-l6",
        "method": {"name": "lora", "r": 0, "rr": 3},
        "data": {"train": "x", "validaton": 0.1},
        "train": {"lr": -1, "batch_sise": 8},
    }
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "method.r: must be greater than 0" in message
    assert "method.rr: unknown key; did you mean 'r'?" in message
    assert "data.validaton: unknown key; did you mean 'validation'?" in message
    assert "train.lr: must be greater than 0" in message
    assert "train.batch_sise: unknown key; did you mean 'batch_size'?" in message


def test_unknown_method_gets_a_hint() -> None:
    with pytest.raises(ConfigError, match="unknown method 'lorra'; did you mean 'lora'"):
        load_config({"model": "m", "method": "lorra", "data": {"train": "x"}})


def test_missing_required_sections() -> None:
    with pytest.raises(ConfigError) as info:
        load_config({"method": "lora"})
    assert "model: required" in str(info.value)
    assert "data: required" in str(info.value)


def test_bad_fraction_and_conflicting_partial_options() -> None:
    with pytest.raises(ConfigError, match="data.validation: a fraction must be between 0 and 1"):
        load_config({"model": "m", "data": {"train": "x", "validation": 1.5}})
    with pytest.raises(ConfigError, match="freeze_layers or trainable_regex"):
        load_config(
            {
                "model": "m",
                "method": {"name": "partial", "freeze_layers": 2, "trainable_regex": "x"},
                "data": {"train": "x"},
            }
        )


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config({"model": "m", "data": {"train": "x"}}, ["train.lr"])


def test_config_is_frozen() -> None:
    cfg = load_config({"model": "m", "data": {"train": "x"}})
    with pytest.raises(ValueError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_partial_regex_cannot_combine_with_block_options() -> None:
    for extra in ({"unfreeze_every": 1}, {"layer_lr_decay": 0.8}):
        method = {"name": "partial", "trainable_regex": "layer", **extra}
        with pytest.raises(ConfigError, match="cannot combine with trainable_regex"):
            load_config({"model": "m", "method": method, "data": {"train": "x"}})


def test_yaml_off_and_no_are_read_as_the_documented_words(tmp_path: Path) -> None:
    """YAML 1.1 reads a bare `off` as false; where `off` is a documented value, false means it."""
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndata:\n  train: x.jsonl\n  quality: off\n")
    assert load_config(path).data.quality == "off"
    assert load_config({"model": "m", "data": {"train": "x", "quality": False}}).data.quality == "off"
    with pytest.raises(ConfigError, match="data.quality: must be 'fail', 'warn' or 'off' .got True."):
        load_config({"model": "m", "data": {"train": "x", "quality": True}})  # no documented word means true


def test_unknown_task_gets_a_hint() -> None:
    with pytest.raises(ConfigError, match="task: must be .* \\(got 'sfft'\\); did you mean 'sft'\\?"):
        load_config({"model": "m", "task": "sfft", "data": {"train": "x"}})


def test_task_sections_come_from_the_tasks() -> None:
    from tunesmith.tasks.dpo import DpoConfig
    from tunesmith.tasks.rl import RlConfig

    cfg = load_config({"model": "m", "task": "dpo", "dpo": {"beta": 0.2}, "data": {"train": "x"}})
    assert isinstance(cfg.section("dpo"), DpoConfig) and cfg.section("dpo").beta == 0.2
    assert isinstance(cfg.section("rl"), RlConfig)  # every registered task's section, at its defaults
    with pytest.raises(ConfigError, match="dpo.betta: unknown key; did you mean 'beta'"):
        load_config({"model": "m", "task": "dpo", "dpo": {"betta": 0.2}, "data": {"train": "x"}})
