"""The shapes of one training row through a model: what each layer and each matmul takes in and
gives out, and the FLOPs it costs, seen in one forward pass without gradients (`probe_row`).

`tunesmith plan` estimates memory and time from these shapes (tunesmith.training.estimate). Reading
them off a real forward pass, rather than off each model family's config, keeps the estimate free of
per-family code: a BERT, a Llama, Whisper's encoder and decoder and a conv net are all layers with
inputs and outputs. One row is enough: the rows of a batch are padded to one width, so a batch of B
rows is B times the row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from tunesmith.models.anatomy import is_linear

__all__ = ["Call", "Held", "Kind", "RowProbe", "probe_row"]

# Leaf layers (layers without sub-layers) by what their backward pass needs, and the operators that
# run outside any leaf layer (attention's matmuls and softmax) by the same measure.
Kind = Literal[
    "matmul", "norm", "dropout", "other", "op-matmul", "op-attention", "op-softmax", "op-dropout", "op-activation"
]

# Elementwise nonlinearities called as functions (F.relu6, F.gelu), not as layers: each keeps its input.
_ACTIVATIONS = {f"aten.{name}" for name in ("relu", "hardtanh", "gelu", "silu", "sigmoid", "tanh", "hardswish", "elu")}


@dataclass(frozen=True)
class Held:
    """A tensor by its storage (two views of one storage are one tensor) and the bytes it holds."""

    key: int
    nbytes: int


@dataclass(frozen=True)
class Call:
    """One call of a leaf layer, or one operator outside the leaf layers, in the probed pass."""

    name: str  # the layer's name, or the operator's
    kind: Kind
    trains: bool  # its own weights get gradients
    grad_in: bool  # a layer that trains ran before it: the gradient flows back through it
    block: str | None  # the block it runs in, if that block can be checkpointed
    inputs: tuple[Held, ...]  # its input (an operator's: each of its tensor inputs)
    output: Held | None
    mask_bytes: int  # a dropout's mask (one byte per element; in the input's dtype for attention's)
    flops: int  # forward FLOPs of its matmuls, convolutions and attention


@dataclass
class RowProbe:
    """What one row did in a forward pass (see `probe_row`)."""

    length: int  # the row's length as its objective counts it
    calls: list[Call] = field(default_factory=list)
    block_inputs: dict[str, int] = field(default_factory=dict)  # checkpointable block -> its input bytes
    checkpointed: set[str] = field(default_factory=set)  # blocks with gradient checkpointing on


def probe_row(model: nn.Module, inputs: dict[str, Any], autocast: Callable[[], Any], length: int) -> RowProbe:
    """Run `model(**inputs)` once in training mode without gradients and record every leaf layer's
    call and every matmul, attention, softmax and dropout operator outside them.

    Training mode, so that dropout and the attention kernel are those training runs; the random
    number generator is put back afterwards, so the probe leaves the run's randomness as it was.

    Args:
        model: the run's model, with its method applied (so `requires_grad` says what trains).
        inputs: one collated row, as the model takes it.
        autocast: the runtime's autocast (sizes are recorded in the dtypes training uses).
        length: the row's length, kept with the shapes.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    names = {m: name for name, m in model.named_modules()}
    blocks: dict[nn.Module, str] = {m: n for m, n in names.items() if isinstance(m, GradientCheckpointingLayer)}
    tracker = _Tracker(RowProbe(length), names, blocks)
    handles = [m.register_forward_pre_hook(tracker.enter, with_kwargs=True) for m in names]
    handles += [m.register_forward_hook(tracker.leave, with_kwargs=True) for m in names]
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad(), autocast(), _OperatorWatch(tracker):
            model(**inputs)
    finally:
        tracker.held.clear()
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return tracker.probe


class _Tracker:
    """Forward hooks keeping the stack of running layers; records leaf layers and loose operators.

    The tensors of calls the gradient flows through are held until the probe ends, so that no
    storage is freed and reused: a storage's address then names one tensor (a row's worth)."""

    def __init__(self, probe: RowProbe, names: dict[nn.Module, str], blocks: dict[nn.Module, str]) -> None:
        self.probe, self.names, self.blocks = probe, names, blocks
        self.stack: list[nn.Module] = []
        self.flops: list[int] = []  # FLOPs of each running layer so far
        self.seen_training = False  # a layer with trainable weights has run
        self.held: list[torch.Tensor] = []

    def enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.stack.append(module)
        self.flops.append(0)
        if module in self.blocks:
            name = self.blocks[module]
            self.probe.block_inputs[name] = _nbytes(_first_tensor([args, kwargs]))
            if getattr(module, "gradient_checkpointing", False):
                self.probe.checkpointed.add(name)

    def leave(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not self.stack or self.stack[-1] is not module:
            return  # a layer that raised inside: nothing to record
        self.stack.pop()
        flops = self.flops.pop()
        trains = _trains(module)
        if not _has_children(module):
            x, y = _first_tensor([args, kwargs]), _first_tensor(output)
            kind = _kind(module)
            mask = x.numel() if kind == "dropout" and x is not None else 0
            self._add(self.names.get(module, type(module).__name__), kind, trains, [x], y, mask, flops)
        self.seen_training = self.seen_training or trains  # (a container: IA3's scaling vectors)

    def in_leaf(self) -> bool:
        return bool(self.stack) and not _has_children(self.stack[-1])

    def operator(self, kind: Kind, name: str, inputs: list[torch.Tensor], out: Any, mask: int, flops: int) -> None:
        """An operator's work: a running leaf layer's FLOPs, else a call of its own."""
        if self.in_leaf():
            self.flops[-1] += flops
        else:
            self._add(name, kind, False, inputs, _first_tensor(out), mask, flops)

    def _add(self, name: str, kind: Kind, trains: bool, inputs: list, output: Any, mask: int, flops: int) -> None:
        block = next((self.blocks[m] for m in reversed(self.stack) if m in self.blocks), None)
        if trains or self.seen_training:
            self.held += [t for t in (*inputs, output) if t is not None]
        held = tuple(_held(t) for t in inputs if t is not None)
        result = None if output is None else _held(output)
        self.probe.calls.append(Call(name, kind, trains, self.seen_training, block, held, result, mask, flops))


class _OperatorWatch(TorchDispatchMode):
    """Sees every operator: FLOPs by torch's own formulas (torch.utils.flop_counter) and, for the CPU
    flash-attention kernel those leave out, 4 * Tq * Tk * d per head (QK^T, then the weighted sum of V)."""

    def __init__(self, tracker: _Tracker) -> None:
        super().__init__()
        self.tracker = tracker

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = str(func._overloadpacket)
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        watch = self.tracker.operator
        if "scaled_dot_product" in packet:
            q, k = args[0], args[1]
            # the kernel keeps q, k, v, the mask and every output (the attention and its logsumexp)
            extra = [t for t in (out if isinstance(out, tuple) else ())[1:] if isinstance(t, torch.Tensor)]
            watch("op-attention", packet, tensors + extra, out, 0, 4 * q.numel() * k.shape[-2])
        elif func._overloadpacket in flop_registry:
            flops = int(flop_registry[func._overloadpacket](*args, **kwargs, out_val=out))
            watch("op-matmul", packet, tensors, out, 0, flops)
        elif packet in ("aten._softmax", "aten._safe_softmax", "aten._log_softmax"):
            watch("op-softmax", packet, tensors, out, 0, 0)
        elif packet in _ACTIVATIONS:
            watch("op-activation", packet, tensors[:1], out, 0, 0)
        elif packet == "aten.mul" and len(tensors) == 2 and tensors[0].shape == tensors[1].shape:
            # A product of two activations (a gated MLP's act(gate) * up) keeps both factors.
            watch("op-activation", packet, tensors, out, 0, 0)
        elif packet == "aten.native_dropout":  # a boolean mask
            watch("op-dropout", packet, tensors[:1], None, tensors[0].numel(), 0)
        elif packet == "aten.bernoulli_":  # the mask of attention's dropout, in the scores' dtype
            watch("op-dropout", packet, [], None, _nbytes(_first_tensor(out)), 0)
        return out


def _trains(module: nn.Module) -> bool:
    """Whether the module's own weights train (those of a ParameterDict it holds included: IA3's)."""
    own = list(module.parameters(recurse=False))
    own += [
        p
        for child in module.children()
        if isinstance(child, nn.ParameterDict | nn.ParameterList)
        for p in child.parameters()
    ]
    return any(p.requires_grad for p in own)


def _held(t: torch.Tensor) -> Held:
    storage = t.untyped_storage()
    return Held(storage.data_ptr(), storage.nbytes())


def _has_children(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def _kind(module: nn.Module) -> Kind:
    if is_linear(module) or isinstance(module, nn.modules.conv._ConvNd):
        return "matmul"
    name = type(module).__name__
    if "Norm" in name:
        return "norm"
    if "Dropout" in name:
        return "dropout"
    return "other"


def _first_tensor(value: Any) -> torch.Tensor | None:
    """The first tensor in a layer's arguments or output (a tensor, a tuple, or a model output)."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()
