"""Preference pairs from a model's own samples, ranked by a reward (`tunesmith data pairs`).

For each prompt, sample several completions, score them with a reward run or a Python function,
and keep the best as `chosen` and the worst as `rejected`: how preference data is collected at
scale, with a reward model standing in for the people who would rank the samples. Prompts whose
samples all score the same (or read the same) give no pair and are counted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.errors import ConfigError
from tunesmith.inference import Trained, load_base, load_trained, read_prompts, runtime_for
from tunesmith.inference.drift import sample
from tunesmith.models.generate import Sampling
from tunesmith.runs import atomic_writer
from tunesmith.tasks.rl.rewards import load_reward

__all__ = ["PairsSummary", "build_pairs"]


@dataclass(frozen=True)
class PairsSummary:
    output: str
    prompts: int
    pairs: int
    ties: int  # prompts whose samples all scored (or read) the same
    reward: dict[str, Any]


def build_pairs(
    prompts: str | Path, out: str | Path, policy: str, reward: str, samples: int = 4, sampling: Sampling | None = None
) -> PairsSummary:
    """Write `{prompt, chosen, rejected, chosen_score, rejected_score}` rows to `out` (JSONL, atomically).

    Args:
        prompts: a data file or packaged name with prompts ({prompt}, chat messages, ...).
        policy: a finished run of a causal-LM task (sft, dpo, rl), or a model (packaged name, directory,
            .gguf, hub id) to sample from.
        reward: a reward run directory, or module:function.
        samples: completions per prompt (at least 2).
    """
    if samples < 2:
        raise ConfigError(f"--samples {samples}: a pair needs at least 2 samples per prompt")
    loaded = load_reward(reward)
    trained = _policy(policy, str(prompts))
    score, record = loaded.bind(runtime_for(trained)), loaded.record
    rows = read_prompts(prompts, trained.config.data)
    texts = [e.messages[-1].content if e.messages else (e.text or "") for e in rows]
    sampling = sampling or Sampling(max_new_tokens=64, temperature=1.0, top_p=1.0)
    _, _, completions = sample(trained, [t for t in texts for _ in range(samples)], sampling)
    scores = [float(s) for s in score([t for t in texts for _ in range(samples)], completions)]
    pairs = ties = 0
    with atomic_writer(Path(out)) as fh:
        for i, prompt in enumerate(texts):
            group = list(
                zip(scores[i * samples : (i + 1) * samples], completions[i * samples : (i + 1) * samples], strict=True)
            )
            best, worst = max(group, key=lambda g: g[0]), min(group, key=lambda g: g[0])
            if best[0] == worst[0] or best[1].strip() == worst[1].strip():
                ties += 1
                continue
            row = {
                "prompt": prompt,
                "chosen": best[1],
                "rejected": worst[1],
                "chosen_score": best[0],
                "rejected_score": worst[0],
            }
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            pairs += 1
    return PairsSummary(str(out), len(texts), pairs, ties, record)


def _policy(policy: str, prompts: str) -> Trained:
    """A loaded run, or a base model loaded as instruction tuning would load it (sampled as it is)."""
    if (Path(policy) / "config.yaml").is_file():
        return load_trained(policy)
    return load_base(policy, "sft", prompts)
