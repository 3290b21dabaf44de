"""The training optimizer: torch's fused AdamW where the parameters allow it, with AdamW's updates."""

from __future__ import annotations

import torch

from tunesmith.training.optim import adamw


def _groups(params: list[torch.Tensor]) -> list[dict]:
    return [{"params": params[:1], "weight_decay": 0.01}, {"params": params[1:], "weight_decay": 0.0, "lr": 2e-3}]


def test_fused_adamw_makes_the_per_tensor_loop_s_updates_and_reads_its_state() -> None:
    torch.manual_seed(0)
    start = [torch.randn(5, 3), torch.randn(7), torch.randn(2, 2, 2)]
    fused_params = [nn_param(t) for t in start]
    loop_params = [nn_param(t) for t in start]
    fused = adamw(_groups(fused_params), 1e-3)
    loop = torch.optim.AdamW(_groups(loop_params), lr=1e-3)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    for step in range(5):
        for params in (fused_params, loop_params):
            for i, p in enumerate(params):
                p.grad = torch.full_like(p, 0.1 * (step + 1)) * (i + 1) + torch.sin(p.detach())
        fused.step()
        loop.step()
    for a, b in zip(fused_params, loop_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    again = adamw(_groups(fused_params), 1e-3)
    again.load_state_dict(loop.state_dict())  # a checkpoint of the loop form resumes in the fused one
    assert again.state_dict()["state"].keys() == loop.state_dict()["state"].keys()


def test_parameters_the_fused_kernel_cannot_take_get_the_loop() -> None:
    double = nn_param(torch.randn(3, dtype=torch.float64))
    meta = nn_param(torch.randn(3, device="meta"))
    assert adamw([{"params": [double]}], 1e-3).defaults["fused"]  # fp64 is fused too
    assert not adamw([{"params": [meta]}], 1e-3).defaults["fused"]


def nn_param(t: torch.Tensor) -> torch.nn.Parameter:
    return torch.nn.Parameter(t.clone())
