"""Attention with dropout that keeps no (query x key) tensor for the backward pass.

With dropout on the attention weights (BERT-family encoders train with 0.1), torch's fused
attention cannot run on a CPU and falls back to its unfused form, which keeps for the backward pass
the softmax's output, the dropout mask and the dropped weights: three tensors of batch x heads x
queries x keys each layer. For MiniLM at 32 x 128 tokens that form saved 90 MB a layer against
this attention's 11 MB (bf16), most of a training step's activations. This attention keeps the
query, key and value alone (which the projections before it keep anyway), and its dropout mask at
one bit an element (training/dropout.py): the backward pass computes the scores and softmax again,
exactly as the forward pass did, and unpacks the mask. That is one more
(query x key) matmul per layer in the backward pass, against two fewer full passes over
memory-bound tensors and torch's per-element Bernoulli draw (at that shape: 62 against 103 ms).

The function is registered with transformers' attention interface as `ATTENTION` ("tunesmith_lean");
without dropout (evaluation, or a model whose attention does not drop) it is torch's fused kernel,
as "sdpa" is. Whether a run uses it is measured on each machine (training/kernels.py).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tunesmith.training.dropout import DropMask

__all__ = ["ATTENTION", "additive", "dropped_attention", "lean_attention_forward", "register"]

ATTENTION = "tunesmith_lean"


def dropped_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    bias: torch.Tensor | None,
    p: float,
    scale: float,
) -> torch.Tensor:
    """softmax(query keyᵀ · scale + bias) with dropout `p`, times value: (batch, heads, queries, dim).

    `bias` is additive (0 where a key is attended, a large negative number where not), broadcast
    over (batch, heads, queries, keys); key and value have as many heads as the query. The softmax
    runs in fp32 (as transformers' eager attention); the matmuls in the inputs' dtype.
    """
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    return _DroppedAttention.apply(query, key, value, bias, scale, DropMask(torch.Size(shape), p, query.device))  # type: ignore[no-any-return]


def additive(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean mask (True: attend) as the fp32 bias added to the scores."""
    return torch.zeros(allowed.shape, device=allowed.device).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def _softmax_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _probs(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None, scale: float) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)).to(_softmax_dtype(q)).mul_(scale)
    if bias is not None:
        scores.add_(bias)
    return scores.softmax(-1)


class _DroppedAttention(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        scale: float,
        mask: DropMask,
    ) -> torch.Tensor:
        probs = _probs(q, k, bias, scale)
        probs.mul_(mask.kept(probs.dtype))
        out = torch.matmul(probs.to(v.dtype), v).mul_(mask.scale)
        ctx.scale, ctx.probs_dtype = scale, probs.dtype
        mask.keep(ctx, q, k, v, *(() if bias is None else (bias,)))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved, kept = ctx.mask.restore(ctx, ctx.probs_dtype)
        q, k, v = saved[:3]
        bias = saved[3] if len(saved) > 3 else None
        rescale = ctx.mask.scale
        probs = _probs(q, k, bias, ctx.scale)
        dropped = probs * kept
        grad = grad.to(v.dtype)
        grad_v = torch.matmul(dropped.to(v.dtype).transpose(-1, -2), grad).mul_(rescale)
        del dropped
        # d(dropped probs) -> d(probs) -> d(scores): softmax's backward, p * (g - sum(g * p))
        grad_probs = torch.matmul(grad, v.transpose(-1, -2)).to(probs.dtype).mul_(rescale).mul_(kept)
        grad_scores = grad_probs.sub_((grad_probs * probs).sum(-1, keepdim=True)).mul_(probs).mul_(ctx.scale)
        del probs
        grad_scores = grad_scores.to(q.dtype)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), q)
        return grad_q, grad_k, grad_v, None, None, None


def lean_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: (batch, heads, tokens, dim) in, (batch, tokens,
    heads, dim) out. Without dropout, or where gradients are not recorded, torch's fused kernel."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    special = any(kwargs.get(k) is not None for k in ("position_bias", "sliding_window", "softcap", "s_aux"))
    if dropout == 0.0 or not torch.is_grad_enabled() or special:  # what this attention does not do: torch's
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)  # type: ignore[no-any-return]
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if groups > 1:
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    q_length, k_length = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else bool(getattr(module, "is_causal", False))
    bias = None
    if attention_mask is not None:
        mask = attention_mask[..., :k_length]
        bias = additive(mask) if mask.dtype == torch.bool else mask.float()
    elif causal and q_length > 1:
        bias = additive(torch.ones(q_length, k_length, dtype=torch.bool, device=query.device).tril(k_length - q_length))
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = dropped_attention(query, key, value, bias, dropout, scale)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `ATTENTION` a name transformers' models accept as their attention implementation, with
    the masks that models build for "sdpa" (a boolean mask, or none where nothing is masked)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, lean_attention_forward)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
