"""A lean decoding step for Llama-family decoders on the CPU: one token per row against a static
KV cache, fused projections, no per-step Python of a general-purpose forward.

A decoding step multiplies a few rows by every weight of the model, so it is bound by reading the
weights; what `transformers`' forward adds around the matmuls (the cache growing by concatenation,
masks rebuilt per layer, a general attention dispatch, some 800 small ops a step for a 30-block
model) cost SmolLM2-135M about a third of each step on a 2-core CPU. This step does what vLLM's and
llama.cpp's decoding loops do, in plain torch ops:

- q/k/v and gate/up are each one matmul over weights stacked once per generation, LoRA's active
  adapters merged in (B @ A * scaling, what peft's `get_delta_weight` adds) and the attention scale
  folded into q; each stacked weight runs through the kernel `packed.fastest_linear` measured
  fastest for its shape (plain, oneDNN-reordered or weights-first);
- keys and values are written into a cache sized for the whole generation (no concatenation), and
  one additive mask per step covers left padding and the columns not yet written;
- attention for one query row is two batched matmuls over key/value groups (grouped-query heads
  read their shared keys in place, never repeated).

It runs only where its result is the model's own: the blocks are `transformers`' Llama, Mistral or
Qwen2 layers (RMSNorm, rotary positions through the model's own `rotary_emb`, SiLU-gated MLP, no
sliding window in reach) on the CPU, each projection a plain `nn.Linear` or a peft LoRA linear
without DoRA; anything else (IA3, bottleneck adapters, other architectures, sharded parameters, an
accelerator) keeps the `transformers` forward. In fp32 its hidden states agree with that forward to
float rounding (tests check).

Under bf16 autocast (`precision: bf16`, what `auto` picks on a CPU whose bf16 matmuls measured
faster), the step does what autocast does to that forward: every projection multiplies in bf16
(weights cast, stacked and merged once per generation instead of autocast's cast at every call;
frozen weights the training loop already keeps in bf16 are read as they are), while the residual
stream, the norms, rotary positions and attention stay in fp32, where `transformers`' forward keeps
them or autocast promotes them. Half the bytes a step reads; the hidden states differ from
autocast's by bf16 rounding (a LoRA delta is merged before rounding rather than added after), which
tests bound by autocast's own distance from fp32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.packed import fastest_linear

__all__ = ["LeanDecoder", "lean_decoder"]

_FAMILIES = {"llama", "mistral", "qwen2"}  # same block: pre-norm RMSNorm, rotary q/k, SiLU-gated MLP
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lean_decoder(
    decoder: Any, head: nn.Module, cache: Any, mask: torch.Tensor, rows: int, steps: int
) -> LeanDecoder | None:
    """A `LeanDecoder` continuing from a prefilled `transformers` cache, or None where `decoder`
    (the base model under any peft wrapper) and its output layer `head` are not ones this step
    reproduces exactly."""
    dtype = _matmul_dtype()
    head_ok = _parts(head) is not None and all(p.dtype in (torch.float32, dtype) for p in head.parameters())
    if dtype is None or steps < 1 or not head_ok or _unsupported(decoder, cache, mask.shape[1], steps) is not None:
        return None
    return LeanDecoder(decoder, head, cache, mask, rows, steps, dtype)


def _matmul_dtype() -> torch.dtype | None:
    """The dtype the model's matmuls run in here: fp32, bf16 under CPU bf16 autocast, None under
    any other autocast."""
    if not torch.is_autocast_enabled("cpu"):
        return torch.float32
    return torch.bfloat16 if torch.get_autocast_dtype("cpu") == torch.bfloat16 else None


def _unsupported(decoder: Any, cache: Any, prompt: int, steps: int) -> str | None:
    """Why the lean step cannot stand in for `decoder`'s forward, or None when it can."""
    config = getattr(decoder, "config", None)
    if config is None or getattr(config, "model_type", None) not in _FAMILIES:
        return "not a Llama-family decoder"
    if getattr(config, "hidden_act", None) != "silu":
        return "activation is not SiLU"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and prompt + steps > window:
        return "sliding window within reach"
    embed = getattr(decoder, "embed_tokens", None)
    if not isinstance(embed, nn.Embedding) or embed.weight.device.type != "cpu":
        return "not on the CPU"
    matmuls = _matmul_dtype()
    if matmuls is None:
        return "autocast to a dtype other than bf16"
    layers = getattr(decoder, "layers", None)
    if layers is None or not hasattr(decoder, "rotary_emb") or not hasattr(decoder, "norm"):
        return "unfamiliar decoder layout"
    if any(type(p.detach()) is not torch.Tensor for p in decoder.parameters()):
        return "parameters are not plain tensors"  # DTensors of a model split over processes
    projected = {id(p) for layer in layers for owner in (layer.self_attn, layer.mlp) for p in owner.parameters()}
    for p in decoder.parameters():
        # Under bf16 autocast, projection weights kept in bf16 are what autocast would multiply by;
        # anything else in a low precision (a norm's weight, an embedding) computes differently.
        if p.dtype != torch.float32 and not (p.dtype == matmuls and id(p) in projected):
            return f"parameters in {p.dtype} outside bf16 autocast's matmuls"
    cached = getattr(cache, "layers", None)
    if cached is None or len(cached) != len(layers) or any(getattr(c, "keys", None) is None for c in cached):
        return "unfamiliar cache"
    if cached[0].keys.shape[-2] != prompt:
        return "cache and mask disagree"
    for layer in layers:
        for name in _PROJECTIONS:
            owner = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            if _parts(getattr(owner, name, None)) is None:
                return f"{name} is neither a linear nor a LoRA linear"
        if type(layer.mlp).__name__ not in {"LlamaMLP", "MistralMLP", "Qwen2MLP"}:
            return "unfamiliar MLP"
    return None


_Parts = tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor, float]]]


def _parts(module: Any) -> _Parts | None:
    """(weight, bias, [(B, A, scaling) per active LoRA adapter]) of a plain or LoRA linear, which
    in eval mode computes x @ (weight + sum of scaling * B @ A).T + bias; None for anything else."""
    if type(module) is nn.Linear:
        return module.weight.detach(), _detached(module.bias), []
    from peft.tuners.lora import Linear as LoraLinear  # peft is imported by then when LoRA is in use

    # (or its subclass that runs a training step fused and everything else as peft: training/fused_lora.py)
    plain = type(module) is LoraLinear or getattr(type(module), "peft_forward_outside_training", False)
    if not plain or type(module.base_layer) is not nn.Linear or module.fan_in_fan_out:
        return None
    base = module.base_layer
    if module.disable_adapters or module.merged:
        return base.weight.detach(), _detached(base.bias), []
    active = [a for a in module.active_adapters if a in module.lora_A]
    if any(module.use_dora.get(a) or module.lora_bias.get(a) or module.lora_variant.get(a) for a in active):
        return None  # DoRA, trained LoRA biases, other variants: the general forward
    lora_a: Any = module.lora_A
    lora_b: Any = module.lora_B
    deltas = [(lora_b[a].weight.detach(), lora_a[a].weight.detach(), float(module.scaling[a])) for a in active]
    return base.weight.detach(), _detached(base.bias), deltas


def _detached(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


class _Linear:
    """One (possibly fused) projection, through whichever kernel `fastest_linear` measured
    fastest for `rows` rows over `steps` steps; `scales` multiply each module's output (folded
    into its rows of the weight, never into the model's own)."""

    def __init__(
        self,
        modules: list[Any],
        rows: int,
        steps: int,
        scales: list[float] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        scales = scales or [1.0] * len(modules)
        parts = [p for p in (_parts(m) for m in modules) if p is not None]
        assert len(parts) == len(modules), "lean_decoder checked every projection"
        if len(parts) == 1 and not parts[0][2] and scales[0] == 1.0:
            weight, bias = parts[0][0], parts[0][1]  # the model's own, read only where it has `dtype`
            self.weight = weight.to(dtype).contiguous()
            self.bias = None if bias is None else bias.to(dtype)
        else:
            self.weight, self.bias = _fused(parts, scales, dtype)
        self.dtype = dtype
        self.kernel = fastest_linear(self.weight, rows, steps)
        if self.kernel == "packed":
            self.weight = torch.ops.mkldnn._reorder_linear_weight(self.weight, rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.kernel == "packed":
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")  # type: ignore[no-any-return]
        if self.kernel == "weights-first":  # (out, in) @ (in, B), then back to (B, out)
            out = (
                torch.mm(self.weight, x.t())
                if self.bias is None
                else torch.addmm(self.bias[:, None], self.weight, x.t())
            )
            return out.t().contiguous()
        return F.linear(x, self.weight, self.bias)


def _fused(
    parts: list[_Parts], scales: list[float], dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) in `dtype` for several projections of the same input, stacked by output
    rows, each with its adapters merged (what peft's `get_delta_weight` adds, here added in place,
    to write the stacked weight once) and its scale applied; built in fp32, rounded once at the end."""
    first = parts[0][0]
    weight = first.new_empty((sum(w.shape[0] for w, _, _ in parts), first.shape[1]), dtype=torch.float32)
    bias = None if all(b is None for _, b, _ in parts) else weight.new_zeros(weight.shape[0])
    row = 0
    for (w, b, deltas), scale in zip(parts, scales, strict=True):
        rows = slice(row, row + w.shape[0])
        weight[rows].copy_(w)
        for lora_b, lora_a, scaling in deltas:
            weight[rows].addmm_(lora_b.float(), lora_a.float(), alpha=scaling)
        if bias is not None and b is not None:
            bias[rows].copy_(b)
        if scale != 1.0:
            weight[rows].mul_(scale)
            if bias is not None:
                bias[rows].mul_(scale)
        row += w.shape[0]
    return weight.to(dtype), None if bias is None else bias.to(dtype)


class LeanDecoder:
    """Decoding steps for `rows` sequences, continuing a prefilled cache for up to `steps` tokens,
    with the projections' matmuls in `dtype` (fp32, or bf16 as under bf16 autocast)."""

    def __init__(
        self,
        decoder: Any,
        head: nn.Module,
        cache: Any,
        mask: torch.Tensor,
        rows: int,
        steps: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        config = decoder.config
        self.decoder, self.rows, self.dtype = decoder, rows, dtype
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.inner = config.intermediate_size
        self.blocks = [self._block(layer, rows, steps) for layer in decoder.layers]  # type: ignore[union-attr]
        self.head = _Linear([head], rows, steps, dtype=dtype)
        # Keys (transposed, so a step's scores are one contiguous batched matmul) and values for the
        # whole generation: (layers, B, kv heads, D, prompt + steps) and (layers, B, kv heads, prompt + steps, D).
        prompt = mask.shape[1]
        first = cache.layers[0].keys  # attention runs in fp32 (under autocast too: its cache may mix dtypes)
        shape = (len(self.blocks), rows, self.kv_heads)
        self.keys = first.new_zeros((*shape, self.head_dim, prompt + steps), dtype=torch.float32)
        self.values = first.new_zeros((*shape, prompt + steps, self.head_dim), dtype=torch.float32)
        for i, layer in enumerate(cache.layers):
            self.keys[i, ..., :prompt] = layer.keys.transpose(-1, -2)
            self.values[i, :, :, :prompt] = layer.values
        # Additive attention mask: 0 where a row attends, -inf at left padding and columns not yet written.
        self.bias = torch.full((rows, 1, 1, prompt + steps), float("-inf"), device=first.device)
        self.bias[:, 0, 0, :prompt].masked_fill_(mask.bool(), 0.0)
        self.length = prompt

    def _block(self, layer: Any, rows: int, steps: int) -> tuple[Any, ...]:
        attn, mlp = layer.self_attn, layer.mlp
        query_scale = float(getattr(attn, "scaling", self.head_dim**-0.5))  # folded into q: rotation is linear
        dtype = self.dtype
        return (
            layer.input_layernorm,
            _Linear([attn.q_proj, attn.k_proj, attn.v_proj], rows, steps, [query_scale, 1.0, 1.0], dtype),
            _Linear([attn.o_proj], rows, steps, dtype=dtype),
            layer.post_attention_layernorm,
            _Linear([mlp.gate_proj, mlp.up_proj], rows, steps, dtype=dtype),
            _Linear([mlp.down_proj], rows, steps, dtype=dtype),
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, C) -> (B, V) in fp32, as `CausalLM.logits`."""
        return self.head(hidden).float()

    def __call__(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Final hidden states (B, C) after feeding `token` (B,) at `positions` (B,)."""
        with torch.autocast("cpu", enabled=False):  # each op's dtype is chosen here, as autocast would
            return self._step(token, positions)

    def _step(self, token: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, h, kv, d, t = self.rows, self.heads, self.kv_heads, self.head_dim, self.length
        x = self.decoder.embed_tokens(token)  # (B, C)
        cos, sin = self.decoder.rotary_emb(x[:, None], positions[:, None])  # (B, 1, D)
        sin = torch.cat((-sin[..., : d // 2], sin[..., d // 2 :]), -1)  # rotate_half's sign, folded in
        self.bias[:, 0, 0, t] = 0.0
        for i, (norm1, qkv, out, norm2, gate_up, down) in enumerate(self.blocks):
            qk, v = qkv(_rms(x, norm1)).float().split([(h + kv) * d, kv * d], -1)
            qk = _rotate(qk.view(b, h + kv, d), cos, sin)  # (B, heads + kv heads, D)
            self.keys[i, ..., t] = qk[:, h:]
            self.values[i, :, :, t] = v.view(b, kv, d)
            q = qk[:, :h].reshape(b, kv, h // kv, d)  # heads grouped by the kv head they share
            scores = torch.matmul(q, self.keys[i]).add_(self.bias)  # (B, kv, G, all columns); q is scaled
            attended = scores.softmax(-1) @ self.values[i]  # (B, kv, G, D)
            x = x + out(attended.reshape(b, h * d))  # fp32 residual stream, as under autocast
            g, u = gate_up(_rms(x, norm2)).split([self.inner, self.inner], -1)
            x = x + down(F.silu(g).mul_(u))
        self.length = t + 1
        return _rms(x, self.decoder.norm)


def _rms(x: torch.Tensor, norm: Any) -> torch.Tensor:
    """The RMSNorm of Llama-family models (`transformers`' LlamaRMSNorm), in fp32."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def _rotate(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (`transformers`' apply_rotary_pos_emb) of (B, heads, D) by (B, 1, D):
    x * cos + rotate_half(x) * sin, with rotate_half's sign already in `signed_sin`."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), signed_sin)
