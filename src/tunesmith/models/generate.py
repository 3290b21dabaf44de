"""Text generation from a `CausalLM`: batched, left-padded, with a KV cache; greedy or sampled.

The prompt is run once (prefill; once for all rows that share it, as RL's groups do), then one
token per step against the cache. Soft prompts are
handled here rather than through peft's forward, which drops position ids for prompt tuning and
re-inserts the prefix on every call: the virtual tokens (prompt tuning) or the prefix cache
(prefix tuning) are placed in front once, with the positions training used, and the steps after
that run the plain decoder. LoRA, IA3 and adapters live inside the decoder's layers and need nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from tunesmith.models.causal_lm import CausalLM, base_decoder
from tunesmith.models.decode import lean_decoder
from tunesmith.models.packed import packed_linears

__all__ = ["Sampling", "generate_ids"]

TokenCallback = Callable[[int, int], None]  # (row, token id), called as each token is chosen


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


@torch.no_grad()
def generate_ids(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    eos_ids: Sequence[int],
    sampling: Sampling = Sampling(),
    pad_id: int = 0,
    on_token: TokenCallback | None = None,
) -> list[list[int]]:
    """New token ids for each prompt, up to and including the first EOS (or `max_new_tokens`)."""
    was_training = model.training
    model.eval()
    try:
        return _generate(model, prompts, set(eos_ids), sampling, pad_id, on_token)
    finally:
        model.train(was_training)


def _generate(model, prompts, eos, sampling, pad_id, on_token, lean: bool = True) -> list[list[int]]:
    device = model.lm_head.weight.device
    batch, longest = len(prompts), max(len(p) for p in prompts)
    # A prompt sampled several times (RL's groups) is run once; its cache is then copied per row.
    distinct = list(dict.fromkeys(tuple(p) for p in prompts))
    ids = torch.full((len(distinct), longest), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(distinct), longest), dtype=torch.long, device=device)
    for row, prompt in enumerate(distinct):  # left padding: every prompt ends at the last column
        ids[row, longest - len(prompt) :] = torch.tensor(list(prompt), device=device)
        mask[row, longest - len(prompt) :] = 1
    decoder = base_decoder(model.backbone)
    hidden, cache, mask, next_pos = _prefill(model.backbone, decoder, ids, mask)
    if len(distinct) < batch:
        where = {p: i for i, p in enumerate(distinct)}
        index = torch.tensor([where[tuple(p)] for p in prompts], device=device)
        cache.reorder_cache(index)
        hidden, mask, next_pos = hidden[:, -1:][index], mask[index], next_pos[index]
    # The first token comes from the prefill; each later one needs a decoding step.
    fast = lean_decoder(decoder, model.lm_head, cache, mask, batch, sampling.max_new_tokens - 1) if lean else None
    if fast is not None:
        lean_step = lambda token, positions, mask: fast(token, positions)  # noqa: E731
        return _decode(fast.logits, lean_step, hidden[:, -1], next_pos, eos, sampling, pad_id, on_token, mask)

    def step(token: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        nonlocal cache
        result = decoder(
            input_ids=token[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            past_key_values=cache,
            use_cache=True,
        )
        cache = result.past_key_values
        return result.last_hidden_state[:, -1]

    with packed_linears(
        model, batch, sampling.max_new_tokens
    ):  # one token per row a step: weights reordered where that is faster
        return _decode(model.logits, step, hidden[:, -1], next_pos, eos, sampling, pad_id, on_token, mask)


def _decode(logits, step, hidden, next_pos, eos, sampling, pad_id, on_token, mask) -> list[list[int]]:
    """Choose a token per row from `logits(hidden)` (B, C -> V), then `step(token, positions, mask)` to the next
    hidden states, until every row ended or `max_new_tokens` were chosen."""
    device, batch = hidden.device, hidden.shape[0]
    generator = torch.Generator(device=device).manual_seed(sampling.seed)
    out: list[list[int]] = [[] for _ in range(batch)]
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for new in range(sampling.max_new_tokens):
        token = _choose(logits(hidden), sampling, generator)  # (B,)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        for row in (~done).nonzero().flatten().tolist():
            out[row].append(int(token[row]))
            if on_token is not None:
                on_token(row, int(token[row]))
        done |= torch.tensor([int(t) in eos for t in token.tolist()], device=device)
        if bool(done.all()) or new == sampling.max_new_tokens - 1:
            break  # the last token chosen needs no step after it
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        hidden, next_pos = step(token, next_pos, mask), next_pos + 1
    return out


def _prefill(backbone: Any, decoder: Any, ids: torch.Tensor, mask: torch.Tensor):
    """Run the prompts once: (last hidden states, cache, attention mask so far, next positions)."""
    batch = ids.shape[0]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): left padding does not shift positions
    kwargs: dict[str, Any] = {"use_cache": True}
    config = getattr(backbone, "active_peft_config", None)
    virtual = int(config.num_virtual_tokens) if config is not None and config.is_prompt_learning else 0
    if config is not None and virtual:
        # Training put the virtual tokens at positions 0..V-1 and the text after them.
        positions = positions + virtual
        mask = torch.cat([torch.ones((batch, virtual), dtype=mask.dtype, device=mask.device), mask], dim=1)
        prompt = backbone.get_prompt(batch_size=batch)
        if config.peft_type == "PREFIX_TUNING":
            kwargs["past_key_values"] = prompt
            kwargs["input_ids"] = ids
        else:
            embeds = decoder.get_input_embeddings()(ids)
            kwargs["inputs_embeds"] = torch.cat([prompt.to(embeds.dtype), embeds], dim=1)
            positions = torch.cat([torch.arange(virtual, device=ids.device).expand(batch, -1), positions], dim=1)
    else:
        kwargs["input_ids"] = ids
    result = decoder(attention_mask=mask, position_ids=positions, **kwargs)
    return result.last_hidden_state, result.past_key_values, mask, positions[:, -1] + 1


def _choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Greedy at temperature 0; else nucleus sampling (Holtzman et al. 2019) at `top_p`."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    probs = (logits if sampling.temperature == 1 else logits / sampling.temperature).softmax(-1)  # (B, V)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return _inverse_cdf(
        probs, torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    )


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, width: int = 256) -> torch.Tensor:
    """Row i's token drawn with probability probs[i] / probs[i].sum() by a uniform draw u[i] in [0, 1).

    Inverse-CDF sampling: the same distribution as torch.multinomial, whose exponential draw per
    vocabulary entry cost a sixth of a decoding step on a CPU. The cumulative sum is taken in two
    levels, over blocks of `width` entries and then inside the block drawn (in float64; a quarter
    of the cost of one cumulative sum over the whole vocabulary). A token of probability 0 is never
    drawn: the search is `right=True` and stays below the block's total.
    """
    rows, vocab = probs.shape
    blocks = F.pad(probs, (0, (-vocab) % width)).view(rows, -1, width)  # (B, blocks, width)
    mass = blocks.sum(-1, dtype=torch.float64).cumsum_(-1)  # (B, blocks)
    u = u * mass[:, -1:]
    block = torch.searchsorted(mass, u, right=True)  # (B, 1)
    before = torch.where(block > 0, mass.gather(-1, (block - 1).clamp(min=0)), 0.0)
    inner = blocks.gather(1, block[..., None].expand(rows, 1, width)).squeeze(1).double().cumsum_(-1)  # (B, width)
    top = torch.nextafter(inner[:, -1:], torch.zeros_like(inner[:, -1:]))
    rest = torch.minimum((u - before).clamp(min=0), top)
    return (block * width + torch.searchsorted(inner, rest, right=True)).squeeze(-1)
