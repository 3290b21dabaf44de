"""Losses that learn from preferences, as pure functions on per-sequence log-probabilities.

- The reward model's pairwise loss: Bradley-Terry, as in InstructGPT (Ouyang et al. 2022).
- DPO (Rafailov et al. 2023), with conservative label smoothing (cDPO, Mitchell 2023).
- IPO (Azar et al. 2023) and the reference-free, length-normalised SimPO (Meng et al. 2024).
- The group-relative advantages of GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).
- The k3 estimator of the KL divergence to a reference (Schulman 2020).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "DpoLoss",
    "dpo_loss",
    "group_advantages",
    "kl_k3",
    "reward_loss",
    "sequence_sums",
]

DpoLoss = Literal["sigmoid", "ipo", "simpo"]


def reward_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean `-log sigmoid(r_chosen - r_rejected)` over pairs: the chosen response should score higher.

    Args:
        chosen, rejected: (B,) scalar rewards of the two responses of each pair.
    """
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def sequence_sums(token_values: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-sequence sums (n_rows,) of per-token values (N,) that belong to sequence `rows[i]`
    (response tokens only: the caller passes the positions it scores)."""
    out = torch.zeros(n_rows, dtype=token_values.dtype, device=token_values.device)
    return out.index_add(0, rows, token_values)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor | None,
    reference_rejected: torch.Tensor | None,
    beta: float,
    loss_type: DpoLoss = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
    gamma: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The preference loss of a batch of pairs, and the implicit rewards of both responses.

    Args:
        policy_chosen, policy_rejected: (B,) summed log-probabilities of the responses under the policy.
        reference_chosen, reference_rejected: (B,) the same under the frozen reference (unused by simpo).
        beta: the strength of the KL regularisation (DPO, SimPO) or the margin's scale (IPO: 1/(2 beta)).
        loss_type: "sigmoid" (DPO), "ipo", or "simpo".
        label_smoothing: cDPO's assumed share of flipped labels (sigmoid and simpo).
        chosen_tokens, rejected_tokens: (B,) response lengths, for simpo's per-token averages.
        gamma: simpo's target reward margin.

    Returns:
        The mean loss, and the rewards (B,) of the chosen and rejected responses:
        `beta * (log pi - log ref)` (simpo: `beta * mean log pi`), detached.
    """
    if loss_type == "simpo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("simpo averages over response tokens: give chosen_tokens and rejected_tokens")
        chosen = beta * policy_chosen / chosen_tokens
        rejected = beta * policy_rejected / rejected_tokens
        logits = chosen - rejected - gamma
    else:
        if reference_chosen is None or reference_rejected is None:
            raise ValueError(f"{loss_type} compares with the reference: give its log-probabilities")
        chosen = beta * (policy_chosen - reference_chosen)
        rejected = beta * (policy_rejected - reference_rejected)
        logits = (chosen - rejected) / beta  # log-ratio difference h
        if loss_type == "ipo":
            return ((logits - 1 / (2 * beta)) ** 2).mean(), chosen.detach(), rejected.detach()
        logits = beta * logits
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), chosen.detach(), rejected.detach()


def group_advantages(
    rewards: torch.Tensor, group_size: int, kind: Literal["grpo", "rloo"] = "grpo", eps: float = 1e-4
) -> torch.Tensor:
    """Advantages (P*G,) of rewards laid out as P groups of G completions of the same prompt.

    grpo: `(r - mean) / (std + eps)` within the group (std with Bessel's correction); rloo: `r` minus
    the mean of the other G - 1 completions. A group whose rewards are all equal has no signal: its
    advantages are 0.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} (at least 2 each)")
    grouped = rewards.float().view(-1, group_size)  # (P, G)
    mean = grouped.mean(dim=1, keepdim=True)
    if kind == "rloo":
        advantages = (grouped - mean) * group_size / (group_size - 1)
    else:
        std = grouped.std(dim=1, keepdim=True)
        advantages = torch.where(std > 0, (grouped - mean) / (std + eps), torch.zeros_like(grouped))
    return advantages.reshape(-1)


def kl_k3(logp: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy: with
    `d = log ref - log pi`, `exp(d) - d - 1`, which is never negative and unbiased."""
    d = reference_logp - logp
    return torch.exp(d) - d - 1
