"""Next-token cross-entropy through the output layer, in chunks, never holding (tokens, vocab) logits.

A causal LM's output layer maps every hidden state to a vocabulary-sized row of logits: for a
SmolLM2 batch of 8 x 256 tokens that is 8 * 256 * 49,152 floats, 400 MB in fp32, plus as much again
for its gradient. Here the loss is computed a chunk of tokens at a time, and the gradients of the
hidden states and the output weight are computed right then, in the forward pass, while the chunk's
logits exist (the fused linear cross-entropy of Liger-Kernel, Hsu et al. 2024). The backward pass
only scales them, so no logits are kept and none are recomputed. Only trained tokens are passed in
at all: a prompt-masked batch needs logits for its completions alone.

A chunk's logits are the only (tokens, vocab) tensor it holds: they are overwritten in place by
their gradient, which is formed a few rows at a time in fp32 (`_softmax_rows`), and a frozen output
layer is cast to the matmul dtype once, not in every step (`cast_weight`).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["CHUNK_TOKENS", "IGNORE", "cast_weight", "linear_cross_entropy", "token_logprobs", "token_losses"]

CHUNK_TOKENS = 1024  # 1024 x 49,152 logits = 100 MB at a time in bf16 (200 in fp32)
IGNORE = -100  # the label of a position that is not trained (or not scored)


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy of `softmax(hidden @ weight.T)` against `targets`.

    Args:
        hidden: (N, H) hidden states of the N trained positions.
        weight: (V, H) output layer (tied or not); gets a gradient only if it requires one.
        targets: (N,) the next token at each position.
        chunk: tokens per chunk of logits (None: `CHUNK_TOKENS`).

    Returns:
        A 0-d fp32 tensor. Under autocast the matmuls run in the autocast dtype; the softmax and
        the gradients are accumulated in fp32.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph connected
    dtype = _compute_dtype(hidden)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk or CHUNK_TOKENS, dtype)  # type: ignore[no-any-return]


def token_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None
) -> torch.Tensor:
    """Log-probability (N,) of each target token under `softmax(hidden @ weight.T)`, differentiable,
    without holding (N, V) logits: what preference losses need, per token, to sum per sequence.

    The gradient towards the hidden states, `(one_hot - softmax) @ weight` per token, is formed
    in the forward pass while each chunk's logits exist ((N, H) kept); the backward pass scales it
    by each token's incoming gradient. A gradient for `weight` (full fine-tuning) needs every
    token's incoming gradient first, so those chunks' logits are recomputed in the backward pass.

    Args:
        hidden: (N, H) hidden states of the positions that predict `targets`.
        weight: (V, H) output layer.
        targets: (N,) the next token at each position.

    Returns:
        (N,) fp32 log-probabilities (fp64 for fp64 inputs).
    """
    dtype = _compute_dtype(hidden)
    return _TokenLogprobs.apply(hidden, weight, targets, chunk or CHUNK_TOKENS, dtype)  # type: ignore[no-any-return]


@torch.no_grad()
def token_losses(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int | None = None):
    """Per-token cross-entropy (N,) and whether the argmax was right (N,), chunk by chunk (no grad)."""
    dtype = _compute_dtype(hidden)
    chunk = chunk or CHUNK_TOKENS
    losses, correct = [], []
    w = cast_weight(weight, dtype)
    for start in range(0, hidden.shape[0], chunk):
        logits = F.linear(hidden[start : start + chunk].to(dtype), w).float()  # (n, V)
        y = targets[start : start + chunk]
        losses.append(F.cross_entropy(logits, y, reduction="none"))
        correct.append(logits.argmax(-1) == y)
    if not losses:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return empty, empty.bool()
    return torch.cat(losses), torch.cat(correct)


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, dtype: torch.dtype
    ) -> torch.Tensor:
        n = hidden.shape[0]
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = cast_weight(weight, dtype)
        acc = torch.promote_types(torch.float32, dtype)  # softmax and sums in fp32 (fp64 stays fp64)
        grad_h = torch.empty_like(hidden, dtype=acc) if want_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if want_w else None
        target_logp = torch.empty(n, dtype=acc, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, n, chunk):
                h = hidden[start : start + chunk].to(dtype)  # (n_c, H)
                logits = h @ w.T  # (n_c, V), overwritten by d(sum CE)/d(logits) = softmax - one_hot
                part = slice(start, start + chunk)
                _softmax_rows(logits, targets[part], target_logp[part], acc, want_h or want_w)
                if grad_h is not None:
                    grad_h[start : start + chunk] = logits @ w
                if grad_w is not None:
                    grad_w += logits.T @ h
        ctx.save_for_backward(
            grad_h if grad_h is not None else torch.empty(0), grad_w if grad_w is not None else torch.empty(0)
        )
        ctx.hidden_dtype, ctx.weight_dtype, ctx.n = hidden.dtype, weight.dtype, n
        # the 1/N of the mean is applied to the (N, H) gradients in backward, not to (n_c, V) here
        return -target_logp.sum() / n

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n  # the mean's 1/N, with the incoming gradient
        dh = (grad_h * scale).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = (grad_w * scale).to(ctx.weight_dtype) if ctx.needs_input_grad[1] else None
        return dh, dw, None, None, None


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, dtype: torch.dtype
    ) -> torch.Tensor:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        w = cast_weight(weight, dtype)
        acc = torch.promote_types(torch.float32, dtype)
        out = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        jac_h = torch.empty_like(hidden, dtype=acc) if want_h else None  # d logp_i / d h_i, (N, H)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start : start + chunk].to(dtype)  # (n_c, H)
                logits = h @ w.T  # (n_c, V)
                part = slice(start, start + chunk)
                _softmax_rows(logits, targets[part], out[part], acc, jac_h is not None)
                if jac_h is not None:  # d logp_y / d logits = one_hot(y) - softmax: minus what _softmax_rows left
                    jac_h[start : start + chunk] = (logits @ w).neg_()
        ctx.save_for_backward(
            jac_h if jac_h is not None else torch.empty(0),
            hidden if want_w else torch.empty(0),
            weight if want_w else torch.empty(0),
            targets,
        )
        ctx.chunk, ctx.dtype, ctx.hidden_dtype, ctx.weight_dtype = chunk, dtype, hidden.dtype, weight.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor):  # type: ignore[override]
        jac_h, hidden, weight, targets = ctx.saved_tensors
        dh = (jac_h * grad_out[:, None]).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1]:
            acc = torch.promote_types(torch.float32, ctx.dtype)
            w = cast_weight(weight, ctx.dtype)
            dw = torch.zeros_like(weight, dtype=acc)
            with torch.autocast(hidden.device.type, enabled=False):
                for start in range(0, hidden.shape[0], ctx.chunk):
                    h = hidden[start : start + ctx.chunk].to(ctx.dtype)
                    y = targets[start : start + ctx.chunk]
                    rows = torch.arange(len(y), device=y.device)
                    d = (h @ w.T).to(acc).softmax(-1).neg_()  # recomputed: (n_c, V)
                    d[rows, y] += 1.0
                    d *= grad_out[start : start + ctx.chunk, None].to(acc)
                    dw += d.to(ctx.dtype).T.to(acc) @ h.to(acc)
            dw = dw.to(ctx.weight_dtype)
        return dh, dw, None, None, None


# Rows of logits a block of `_softmax_rows` takes: 16 x 49,152 fp32 log-probs are 3 MB, which stay
# in the cache between the passes over them.
_BLOCK_ELEMENTS = 2**20 * 3 // 4


def _softmax_rows(
    logits: torch.Tensor, targets: torch.Tensor, target_logp: torch.Tensor, acc: torch.dtype, gradient: bool = True
) -> None:
    """Write each row's log-probability of its target to `target_logp` and, with `gradient`,
    overwrite each row of `logits` with `softmax(row) - one_hot(target)` (computed in `acc`,
    rounded to the logits' dtype once).

    A few rows at a time: the passes over a block of fp32 rows stay in the cache, and only the
    logits themselves travel to and from memory. Over a whole chunk at once (1,024 x 49,152) each
    pass read and wrote 200 MB: they took half as long again as the chunk's two matmuls. The
    exponent, the costly part, is taken once an element: torch's log-softmax followed by an
    exponent for the gradient took it twice (2.3 against 1.3 ms for 16 x 49,152 on a 2-core EPYC).
    """
    n, vocab = logits.shape
    block = max(1, _BLOCK_ELEMENTS // vocab)
    rows = torch.arange(min(block, n), device=logits.device)
    for start in range(0, n, block):
        part = logits[start : start + block]
        y = targets[start : start + block]
        r = rows[: len(y)]
        top = part.amax(-1, keepdim=True)
        shifted = part.to(acc)  # part itself where it is in `acc` already
        target = shifted[r, y]
        total = shifted.sub_(top).exp_().sum(-1, keepdim=True)  # exp(x - max) and its sum
        target_logp[start : start + block] = target - top.squeeze(-1) - total.squeeze(-1).log()
        if not gradient:
            continue
        probs = shifted.mul_(total.reciprocal())
        probs[r, y] -= 1.0
        if probs is not part:
            part.copy_(probs)


class _LastWeight:
    """The last frozen weight `cast_weight` cast, its version and storage, and its cast: one tuple,
    replaced whole, so that a thread reads one entry, never half of two (a model host serves
    requests in threads)."""

    entry: tuple[weakref.ref[torch.Tensor], tuple[int, int, torch.dtype], torch.Tensor] | None = None


_last_weight = _LastWeight()


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight.to(dtype)`, kept from one call to the next for a weight that does not train.

    An output layer tied to the embedding stays fp32 (the embedding feeds the fp32 residual
    stream), and a LoRA or prompt-tuning step cast all of it (49,152 x 576 for SmolLM2) to bf16
    again in every step: a fresh 57 MB each time, faulted in page by page. A trained weight changes
    every step and is cast each time; a frozen one is cast again only when it has changed (its
    version counter or its storage).
    """
    if weight.dtype == dtype or weight.requires_grad:
        return weight.to(dtype)
    key = (weight._version, weight.data_ptr(), dtype)
    entry = _last_weight.entry
    if entry is not None and entry[0]() is weight and entry[1] == key:
        return entry[2]
    value = weight.to(dtype)
    _last_weight.entry = (weakref.ref(weight, _forget_weight), key, value)
    return value


def _forget_weight(ref: weakref.ref[torch.Tensor]) -> None:
    entry = _last_weight.entry
    if entry is not None and entry[0] is ref:
        _last_weight.entry = None
