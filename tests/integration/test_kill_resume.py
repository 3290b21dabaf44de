"""A run killed with SIGKILL mid-training resumes from its last checkpoint to the same weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

TUNESMITH = Path(sys.executable).with_name("tunesmith")

pytestmark = pytest.mark.slow


def _start(config: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [str(TUNESMITH), "train", str(config), *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_matches_an_uninterrupted_run(base_config: dict, tmp_path: Path) -> None:
    cfg = {**base_config, "method": "full", "train": {**base_config["train"], "epochs": 40, "save_every": 5}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg))

    whole = _start(config, f"output.dir={tmp_path / 'whole'}")
    _, err = whole.communicate(timeout=600)
    assert whole.returncode == 0, err

    killed = _start(config, f"output.dir={tmp_path / 'killed'}")
    deadline = time.time() + 300
    # Kill once a checkpoint past the first exists. Any such step will do: only the last two are kept,
    # so waiting for one exact step could miss it on a loaded machine and let the run finish.
    while time.time() < deadline and not [
        c for c in (tmp_path / "killed").glob("*/checkpoints/step-*") if c.name >= "step-0000010"
    ]:
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    (run_dir,) = (tmp_path / "killed").iterdir()
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "final").exists(), "the run finished before it could be killed"

    resumed = _start(config, "--resume", str(run_dir))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err

    (whole_dir,) = (tmp_path / "whole").iterdir()
    expected = load_file(str(whole_dir / "final" / "trainable.safetensors"))
    got = load_file(str(run_dir / "final" / "trainable.safetensors"))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
