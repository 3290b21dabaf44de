"""How far a tuned causal LM has moved from its base: sample completions from it and measure, per
token, the KL divergence to the base model on those samples (the k3 estimator, as rl's penalty).

The base is the tuned model with its peft adapter switched off where it has one, else the base
model built afresh from the run's config (full, partial, bottleneck adapters).
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch

from tunesmith.data.templates import encode_prompt, resolve_template
from tunesmith.errors import ConfigError
from tunesmith.inference import Trained, base_model
from tunesmith.losses.lm import token_logprobs
from tunesmith.losses.preference import kl_k3
from tunesmith.models.anatomy import adapters_off, can_switch_off
from tunesmith.models.generate import Sampling, generate_ids

__all__ = ["kl_to_base", "sample", "sample_with_kl"]


@torch.no_grad()
def sample(
    trained: Trained, prompts: list[str], sampling: Sampling, batch_size: int = 16, from_base: bool = False
) -> tuple[list[list[int]], list[list[int]], list[str]]:
    """Prompt ids, completion ids and completion texts sampled from a trained causal-LM run (sft, dpo,
    rl), rendered as training rendered its prompts.

    Args:
        from_base: sample from the base instead (the run's peft adapter switched off), for a "before".

    Raises:
        ConfigError: `from_base` for a run whose method has no adapter to switch off.
    """
    model: Any = trained.model.eval()
    tokenizer: Any = trained.objective.tokenizer
    template = resolve_template(tokenizer, trained.config.data.template)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    context = _adapter_off(trained) if from_base else contextlib.nullcontext()
    prompt_ids = [encode_prompt(p, tokenizer, template) for p in prompts]
    completions: list[list[int]] = []
    with context:
        for start in range(0, len(prompt_ids), batch_size):
            part = prompt_ids[start : start + batch_size]
            completions += generate_ids(model, part, model.eos_ids or [tokenizer.eos_token_id], sampling, pad)
    return prompt_ids, completions, tokenizer.batch_decode(completions, skip_special_tokens=True)


@torch.no_grad()
def kl_to_base(trained: Trained, prompt_ids: list[list[int]], completions: list[list[int]]) -> float:
    """Mean per-token KL(tuned || base) over the completion tokens."""
    model = trained.model.eval()
    base = base_model(trained)
    total, tokens = 0.0, 0
    for prompt, completion in zip(prompt_ids, completions, strict=True):
        if not completion:
            continue
        row = torch.tensor([prompt + completion])
        targets = row[0, len(prompt) :]
        policy = _logps(model, row, len(prompt), targets)
        with adapters_off(base):
            reference = _logps(base, row, len(prompt), targets)
        total += float(kl_k3(policy, reference).sum())
        tokens += len(completion)
    return total / max(tokens, 1)


def sample_with_kl(
    trained: Trained, prompts: list[str], sampling: Sampling, batch_size: int = 16
) -> tuple[list[str], float]:
    """Completions sampled from the run, and the mean per-token KL of the run's model to its base on them."""
    prompt_ids, completions, texts = sample(trained, prompts, sampling, batch_size)
    return texts, kl_to_base(trained, prompt_ids, completions)


def _adapter_off(trained: Trained) -> AbstractContextManager[Any]:
    if not can_switch_off(trained.model):
        raise ConfigError(f"{trained.where}: method {trained.config.method.name} has no adapter to switch off")
    return adapters_off(trained.model)


def _logps(model: Any, row: torch.Tensor, start: int, targets: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=row, attention_mask=torch.ones_like(row))
    hidden = out.hidden[0, start - 1 : row.shape[1] - 1]  # the positions that predict the completion
    return token_logprobs(hidden, out.weight, targets)
