"""The learning-rate schedules: transformers' formulas on torch's LambdaLR, without importing
transformers' trainer utilities."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.optim.lr_scheduler import LRScheduler

from conftest import write_halves_npz
from tunesmith.training.schedules import schedule, schedule_factor


def _rates(scheduler: LRScheduler, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    rates = []
    for _ in range(steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedules_follow_transformers_formulas(name: str) -> None:
    from transformers import get_scheduler

    steps, warmup = 23, 4
    ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    expected = _rates(get_scheduler(name, theirs, num_warmup_steps=warmup, num_training_steps=steps), theirs, steps)
    assert _rates(schedule(name, ours, warmup, steps), ours, steps) == pytest.approx(expected, abs=1e-12)


def test_constant_schedule_warms_up_then_holds() -> None:
    assert [schedule_factor("constant", s, 4, 20) for s in (0, 2, 4, 19)] == [0.0, 0.5, 1.0, 1.0]
    assert schedule_factor("linear", 20, 4, 20) == 0.0 and schedule_factor("cosine", 12, 4, 20) == pytest.approx(0.5)


def test_scheduler_state_resumes() -> None:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    first = schedule("cosine", optimizer, 2, 10)
    _rates(first, optimizer, 5)
    again = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = schedule("cosine", again, 2, 10)
    again.load_state_dict(optimizer.state_dict())
    resumed.load_state_dict(first.state_dict())
    assert _rates(resumed, again, 5) == _rates(first, optimizer, 5)


_RUN = """
import json, sys, tunesmith
data, out = sys.argv[1:]
tunesmith.train(
    model="efficientnet-lite0", task="image-classification", method={"name": "full"},
    data={"train": data, "image_size": 32}, train={"max_steps": 2, "batch_size": 8},
    eval={"baseline": False}, output={"dir": out},
)
heavy = ("transformers.optimization", "transformers.trainer_utils", "peft")
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def test_a_run_outside_transformers_does_not_import_its_trainer_utilities(tmp_path: Path) -> None:
    """Importing them (transformers' get_scheduler did) cost 160 MB of resident memory a run."""
    data = write_halves_npz(tmp_path / "halves.npz", n=16)
    args = [sys.executable, "-c", _RUN, str(data), str(tmp_path / "runs")]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    assert json.loads(out.strip().splitlines()[-1]) == []
