"""A LoRA linear layer's training step as one autograd function: base matmul, dropout, A, B, scale
and sum.

peft computes an adapted layer as `base(x) + B(A(dropout(x))) * scaling`: under bf16 autocast
that casts `x` to bf16 twice (once for the base layer, once for A), writes the adapter's full-width
output, scales it in another full-width pass and adds it in a third; the backward pass mirrors it,
with the two input gradients cast to fp32 and summed separately. With rank 8 the adapter's matmuls
are tiny, so those full-width passes and casts, not its FLOPs, are what an adapter costs: in a
SmolLM2 LoRA step the adapter side was about a quarter of the step's time.

Here the adapter's narrow product (rows x rank) is scaled and added into the base output by the
matmul itself (`addmm_`, which accumulates into its output), and in the backward pass the base
input gradient is accumulated the same way onto the adapter's. The input is cast once and the cast
shared by the adapters that read the same tensor (query, key and value; gate and up). What the
backward pass keeps is what training/dropout.py's `dropped_linear` keeps: the input once (or
nothing where models/recompute.py can compute it again), the mask at one bit an element, and the
narrow product. The same masks are drawn as by `DroppedLinear`, one per adapter (peft's semantics).

The sums are formed inside the matmuls (fp32 accumulation) rather than as separately rounded bf16
tensors, so results differ from peft's in the last bits, not beyond. Only what a training step
runs is replaced: evaluation, generation, merged or disabled adapters, DoRA, several active
adapters, trained base weights and biases on the adapter matrices take peft's own path.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.models.recompute import recipe
from tunesmith.training.dropout import DropMask, DroppedLinear

__all__ = ["fuse_lora_linears", "lora_linear"]


def fuse_lora_linears(backbone: nn.Module) -> int:
    """Give every peft LoRA `Linear` over an `nn.Linear` in `backbone` the fused training step (a
    subclass whose forward runs `lora_linear` in training steps and peft's forward otherwise; the
    same module, parameters and state-dict keys); returns how many."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    fused = 0
    for module in backbone.modules():
        if type(module) is LoraLinear and type(module.get_base_layer()) is nn.Linear:
            module.__class__ = _fused_class(LoraLinear)
            fused += 1
    return fused


_FUSED: dict[type, type] = {}


def _fused_class(lora_linear_type: type) -> type:
    """peft's LoRA `Linear` with the fused training forward (built once, on first use, so that
    importing this module does not import peft)."""
    cls = _FUSED.get(lora_linear_type)
    if cls is None:
        # named as peft's own class: peft tells its layer kinds apart by class name
        body = {"forward": _fused_forward, "__module__": __name__, "peft_forward_outside_training": True}
        cls = type("Linear", (lora_linear_type,), body)
        _FUSED[lora_linear_type] = cls
    return cls


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    plain = _plain_adapter(self, x, args, kwargs)
    if plain is None:
        return super(type(self), self).forward(x, *args, **kwargs)  # type: ignore[no-any-return]
    adapter, p = plain
    base = self.get_base_layer()
    a, b = self.lora_A[adapter], self.lora_B[adapter]
    return lora_linear(x, base.weight, base.bias, a.weight, b.weight, float(self.scaling[adapter]), p)


def _plain_adapter(
    module: Any, x: torch.Tensor, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, float] | None:
    """The one active adapter and its dropout when this call is a training step the fused function
    computes as peft would; None where peft's own forward must run."""
    if not (module.training and torch.is_grad_enabled()) or args or kwargs:
        return None
    if module.disable_adapters or module.merged or getattr(module, "fan_in_fan_out", False):
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1 or active[0] in module.lora_variant:
        return None
    adapter = active[0]
    base = module.get_base_layer()
    a, b = module.lora_A[adapter], module.lora_B[adapter]
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    if a.bias is not None or b.bias is not None or not isinstance(b, nn.Linear):
        return None
    if not isinstance(module.lora_dropout[adapter], (nn.Dropout, nn.Identity)):
        return None
    if not (isinstance(a, DroppedLinear) or type(a) is nn.Linear):
        return None
    p = a.p if isinstance(a, DroppedLinear) else _dropout_p(module.lora_dropout[adapter])
    return (adapter, p) if p < 1.0 else None


def _dropout_p(dropout: nn.Module) -> float:
    return float(dropout.p) if isinstance(dropout, nn.Dropout) else 0.0


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    p: float,
) -> torch.Tensor:
    """`linear(x, weight, bias) + linear(linear(dropout(x, p), lora_a), lora_b) * scaling` for a
    frozen `weight` and `bias`, in the autocast dtype where autocast is on (as nn.Linear's)."""
    mask = DropMask(x.shape, p, x.device) if p > 0 else None
    return _LoraLinear.apply(x, weight, bias, lora_a, lora_b, scaling, mask)  # type: ignore[no-any-return]


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
        mask: DropMask | None,
    ) -> torch.Tensor:
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        with torch.autocast(device, enabled=False):
            xc = _cast_once(x, dtype)
            out = F.linear(xc, weight.to(dtype), None if bias is None else bias.to(dtype))
            rows = xc.reshape(-1, xc.shape[-1])
            dropped = rows if mask is None else rows * mask.kept(dtype).view(rows.shape)
            scale = scaling * (1.0 if mask is None else mask.scale)
            narrow = (dropped @ lora_a.to(dtype).t()).mul_(scale)  # rows x rank
            out.view(-1, out.shape[-1]).addmm_(narrow, lora_b.to(dtype).t())
        again = recipe(x)  # x from what autograd keeps anyway, or x itself
        ctx.dtype, ctx.x_dtype, ctx.scale = dtype, x.dtype, scale
        ctx.again, inputs = again if again is not None else (None, (x,))
        # the base weight only where the input needs a gradient (not in the first block of a frozen embedding)
        base = weight if ctx.needs_input_grad[0] else weight.new_empty(0)
        kept = (*inputs, base, lora_a, lora_b, narrow)
        if mask is None:
            ctx.save_for_backward(*kept)
        else:
            mask.keep(ctx, *kept)
        ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved, kept = (ctx.saved_tensors, None) if ctx.mask is None else ctx.mask.restore(ctx, ctx.dtype)
        weight, lora_a, lora_b, narrow = saved[-4:]
        dtype = ctx.dtype
        rows = grad.reshape(-1, grad.shape[-1]).to(dtype)
        b = lora_b.to(dtype)
        grad_narrow = (rows @ b).mul_(ctx.scale)  # rows x rank: the gradient of A's output
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[4]:
            grad_b = (rows.t() @ narrow).to(lora_b.dtype)
        if ctx.needs_input_grad[3]:
            x = ctx.again(*saved[:-4]) if ctx.again is not None else saved[0]
            dropped = _cast_once(x, dtype).reshape(-1, x.shape[-1])
            if kept is not None:
                dropped = dropped * kept.view(dropped.shape)
            grad_a = (grad_narrow.t() @ dropped).to(lora_a.dtype)
        if ctx.needs_input_grad[0]:
            grad_x = grad_narrow @ lora_a.to(dtype)
            if kept is not None:
                grad_x.mul_(kept.view(grad_x.shape))
            grad_x.addmm_(rows, weight.to(dtype))
            grad_x = grad_x.view(*grad.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype)
        return grad_x, None, None, grad_a, grad_b, None, None


class _LastCast:
    """The last tensor cast by `_cast_once`, and its cast: the query, key and value adapters (gate
    and up) read one tensor one after another, forward and backward."""

    source: weakref.ref[torch.Tensor] | None = None
    version: int = -1
    value: torch.Tensor | None = None


_last_cast = _LastCast()


def _cast_once(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x.to(dtype)`, shared with the previous call when that cast the same, unchanged tensor."""
    if x.dtype == dtype:
        return x
    last = _last_cast
    cached = last.value if last.source is not None and last.source() is x and last.version == x._version else None
    if cached is not None and cached.dtype == dtype:
        return cached
    value = x.to(dtype)
    last.source, last.version, last.value = weakref.ref(x, _forget), x._version, value
    return value


def _forget(ref: weakref.ref[torch.Tensor]) -> None:
    if _last_cast.source is ref:
        _last_cast.source, _last_cast.value = None, None
