"""Activations that are cheap to compute again, marked so that the backward pass does not keep them.

Two inputs of a decoder block's LoRA adapters are outputs of cheap elementwise work on tensors that
autograd keeps anyway:
- a normalization's output (RMSNorm, LayerNorm), read by the query, key and value adapters (or gate
  and up): the normalization's own backward keeps its input, so its output can be computed again
  from it;
- a SiLU-gated MLP's product `silu(gate) * up`, read by the down projection's adapter: the gated
  function keeps `gate` and `up` (models/gated_mlp.py).

`mark(out, compute, *inputs)` attaches how to compute `out` again to the tensor itself; a function
that would save `out` for its backward pass (training/dropout.py's folded LoRA input) saves the
inputs of `recipe(out)` instead, when there is one, and calls it on them in the backward pass. The
same kernels run on the same inputs under the same autocast state, so the result is bit for bit
what the forward pass computed (tested: gradients equal to the stock model's). Nothing is kept for a
marked tensor that is never saved, and a tensor changed in place after it was marked is saved as
usual.

The inputs go through `save_for_backward` like any saved tensor (they share storage with what
autograd keeps anyway) and are released with the rest when the backward pass is done; `compute`
holds no tensor. A closure over them, kept on the function's context, outlived the backward pass
for as long as anything held the loss, as a training loop does until the next step's forward pass
is done: the previous step's activations stayed alive through it, 1.3 GB of a SmolLM2 LoRA step
over 8 rows of 512 tokens. (The first block's norm reads the frozen embedding's output, which
nothing else keeps: there the input is kept in place of the output, at the same size.)

In a SmolLM2 LoRA step (8 x 256 tokens, every linear layer adapted) this keeps 630 MB less of the
step's 2.3 GB of saved activations, for one more RMSNorm per block and one more `silu(gate) * up` per
MLP in the backward pass.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["mark", "recipe", "recompute_norm_outputs"]

_ATTR = "_tunesmith_recompute"


Compute = Callable[..., torch.Tensor]


def mark(out: torch.Tensor, compute: Compute, *inputs: torch.Tensor) -> torch.Tensor:
    """Attach to `out` how to compute it again: `compute(*inputs)`, from tensors autograd keeps
    anyway. `compute` must not hold tensors of its own (they would live as long as it does)."""
    device = out.device.type
    autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))

    def own(*tensors: torch.Tensor) -> torch.Tensor:  # one function per mark: what `_last` remembers
        return compute(*tensors)

    setattr(out, _ATTR, (out._version, device, autocast, own, inputs))
    return out


def recipe(t: torch.Tensor) -> tuple[Compute, tuple[torch.Tensor, ...]] | None:
    """How to compute `t` again in the backward pass, if it was marked and not changed since: a
    function and the tensors to call it on, which the caller saves for its backward pass. The
    recomputation runs without gradients under the autocast state `t` was made under.

    The adapters that read one tensor (query, key and value; gate and up) run their backward passes
    one after another, so the last recomputation is kept and handed to the next that asks for the
    same tensor: one RMSNorm computed again per block's attention instead of three. It is dropped
    once no backward pass can ask for it any more. Its users must not change it in place.
    """
    marked = getattr(t, _ATTR, None)
    if marked is None or marked[0] != t._version:
        return None
    _, device, (enabled, dtype), compute, inputs = marked

    def again(*tensors: torch.Tensor) -> torch.Tensor:
        if _last.source is not None and _last.source() is compute and _last.value is not None:
            return _last.value
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            value = compute(*tensors)
        _last.source, _last.value = weakref.ref(compute, _last.forget), value
        return value

    return again, inputs


class _Last:
    """The last recomputed tensor, held while the function that computes it lives (while some
    backward pass may still need it)."""

    source: weakref.ref[Compute] | None = None
    value: torch.Tensor | None = None

    def forget(self, source: weakref.ref[Compute]) -> None:
        if self.source is source:
            self.source = self.value = None


_last = _Last()


def recompute_norm_outputs(model: nn.Module) -> int:
    """Mark the outputs of `model`'s RMSNorm and LayerNorm modules (training only) as computable
    again from their inputs; returns how many modules changed."""
    changed = 0
    for module in model.modules():
        if _is_norm(module) and "forward" not in vars(module):
            module.forward = types.MethodType(_marking_forward(type(module).forward), module)
            changed += 1
    return changed


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")


def _marking_forward(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    def marked(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = forward(self, x)
        if torch.is_grad_enabled() and self.training and isinstance(out, torch.Tensor):
            mark(out, lambda x: forward(self, x), x)
        return out

    return marked
