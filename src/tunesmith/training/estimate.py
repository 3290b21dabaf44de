"""An analytic estimate of a run's peak memory and step time, before it trains (`tunesmith plan`).

The shapes come from one row's forward pass (tunesmith.training.shapes); the rest is arithmetic:

    peak memory = weights + gradients + AdamW state + activations of one micro-batch

- weights: every parameter and buffer as the loop keeps it (fp32; under bf16 the frozen linear
  weights are stored in bf16, as `frozen_matmuls_to_bf16` does).
- gradients: 4 bytes (fp32) per trainable parameter; AdamW state: 8 (exp_avg and exp_avg_sq).
  Gradients fill as activations are freed, so the sum is an upper bound by up to the gradients.
- activations: what the forward pass keeps for the backward pass, summed over the layers the
  gradient flows through (after the first layer that trains; a frozen backbone keeps nothing, which
  is how feature extraction costs activations for its head alone). `kept` gives the rule for
  each kind of layer or operator. With gradient checkpointing a block keeps only its input, and
  one block at a time is recomputed in full during the backward pass.

    FLOPs of a step = sum over matmuls of their forward FLOPs x a multiple:
        3 where the weight trains and the gradient flows on (forward, input gradient, weight
          gradient: the classic 6 x parameters x tokens); 2 for the first trained layer (no input
          gradient),
        2 for a frozen weight the gradient passes through (forward, input gradient: LoRA's base),
        1 for frozen work before anything trains (forward only), 0 where that work is cached,
        +1 for a checkpointed block's recomputed forward pass,
    and time = FLOPs / the measured matmul rate of the device in the run's precision (a lower
    bound: small matmuls and everything that is not a matmul run slower than the peak).

Per-row costs are measured at two row lengths and taken as linear in the length in between, so a
batch of B rows padded to width T costs B x cost(T).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from tunesmith.errors import ConfigError
from tunesmith.models.anatomy import find_blocks, is_linear
from tunesmith.training.loop import frozen_linears
from tunesmith.training.shapes import Call, Held, RowProbe

__all__ = [
    "Lever",
    "MemoryEstimate",
    "RowCosts",
    "kept",
    "levers",
    "memory_estimate",
    "peft_sized",
    "row_costs",
    "trainable_parameters",
]

MB = 2**20
ADAMW_BYTES = 8  # exp_avg and exp_avg_sq, fp32
GRAD_BYTES = 4  # fp32 master weights get fp32 gradients
PEFT_RANK = 8  # LoRA's default rank, for the size of what a PEFT method would train


def kept(call: Call) -> list[Held]:
    """The tensors one call keeps for the backward pass (when the gradient flows through it).

    - a linear or conv layer keeps its input, to form its weight gradient (nothing when the weight
      is frozen: the input gradient needs the weight alone);
    - a norm and any other layer (activation functions, embeddings) keep their input;
    - a dropout keeps its mask (one byte per element; attention's own in the scores' dtype);
    - a matmul outside the layers (attention's QK^T and its weighted sum of V) keeps both operands,
      fused attention keeps q, k, v and its output, a softmax its output, a function-called
      activation or a product of two activations its input(s).

    A tensor several calls keep (the input of q, k and v projections) is counted once.
    """
    if call.kind in ("dropout", "op-dropout"):
        return [Held(-id(call), call.mask_bytes)]  # a new tensor of its own
    if call.kind == "matmul" and not call.trains:
        return []
    if call.kind == "op-attention" and call.output is not None:
        return [*call.inputs, call.output]
    if call.kind == "op-softmax":
        return [call.output] if call.output is not None else []
    return list(call.inputs)  # a trained matmul, norm, other, op-matmul, op-activation


def _on_path(call: Call) -> bool:
    return call.grad_in or call.trains


def _activations(probe: RowProbe, checkpointed: set[str]) -> int:
    """Bytes one row keeps for the backward pass, with `checkpointed` blocks keeping their input."""
    plain: dict[int, int] = {}
    blocks: dict[str, dict[int, int]] = {b: {} for b in checkpointed & set(probe.block_inputs)}
    for call in filter(_on_path, probe.calls):
        into = blocks.get(call.block or "", plain)
        into.update((t.key, t.nbytes) for t in kept(call))
    on_path = [b for b, held in blocks.items() if held]
    recomputed = max((sum(held.values()) for held in blocks.values()), default=0)  # one block at a time
    return sum(plain.values()) + sum(probe.block_inputs[b] for b in on_path) + recomputed


def _flops(probe: RowProbe, cached: bool, checkpointed: set[str]) -> tuple[int, int, int]:
    """FLOPs of one row: in a training step, in the forward pass of an evaluation, and of its frozen
    work before anything trains (done once where it is cached)."""
    step = forward = frozen = 0
    for call in probe.calls:
        forward += 0 if cached and not _on_path(call) else call.flops
        if call.trains:
            times = 3 if call.grad_in else 2
        elif call.grad_in:
            times = 2
        else:
            frozen += call.flops
            times = 0 if cached else 1
        if call.block in checkpointed and _on_path(call):
            times += 1
        step += call.flops * times
    return step, forward, frozen


@dataclass(frozen=True)
class RowCosts:
    """Per-row costs at two lengths (`lengths`), linear in the length in between and beyond."""

    lengths: tuple[int, int]
    activations: tuple[float, float]  # bytes kept for the backward pass
    checkpointed_activations: tuple[float, float]  # the same with every block on the path checkpointed
    flops: tuple[float, float]  # of one training step
    forward_flops: tuple[float, float]  # of one evaluation (forward) pass
    frozen_flops: tuple[float, float]  # forward FLOPs before anything trains (the cacheable work)
    checkpointable: bool  # some block on the gradient path can be checkpointed

    def at(self, pair: tuple[float, float], length: int) -> float:
        """`pair` (one of the fields above) at a row of `length`."""
        (long, short), (a, b) = self.lengths, pair
        if long == short:
            return a
        return max(0.0, b + (a - b) * (length - short) / (long - short))

    def varies(self) -> bool:
        """Whether the row's costs grow with its length (text), or not (images)."""
        return self.lengths[0] != self.lengths[1] and self.activations[0] > self.activations[1]


def row_costs(long: RowProbe, short: RowProbe | None, cached: bool, checkpointing: bool) -> RowCosts:
    """The per-row costs of the probes (`short` None: one length only).

    Args:
        long, short: probes of the longest row and of a shorter one.
        cached: the loop caches the frozen work before the first trained layer.
        checkpointing: gradient checkpointing is on (for the blocks the model turned it on for).
    """
    a, b = long, short or long
    on = (a.checkpointed, b.checkpointed) if checkpointing else (set(), set())
    return RowCosts(
        lengths=(a.length, b.length),
        activations=(_activations(a, on[0]), _activations(b, on[1])),
        checkpointed_activations=(_activations(a, set(a.block_inputs)), _activations(b, set(b.block_inputs))),
        flops=(_flops(a, cached, on[0])[0], _flops(b, cached, on[1])[0]),
        forward_flops=(_flops(a, cached, set())[1], _flops(b, cached, set())[1]),
        frozen_flops=(_flops(a, cached, set())[2], _flops(b, cached, set())[2]),
        checkpointable=any(_on_path(c) and c.block is not None for c in a.calls),
    )


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak memory of training, in bytes, by part."""

    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def as_mb(self) -> dict[str, float]:
        parts = {"weights": self.weights, "gradients": self.gradients, "optimizer": self.optimizer}
        parts |= {"activations": self.activations, "total": self.total}
        return {k: round(v / MB, 1) for k, v in parts.items()}


def memory_estimate(
    model: nn.Module, trained: Sequence[str], precision: str, costs: RowCosts, rows: int, length: int
) -> MemoryEstimate:
    """Peak memory of training `model` on micro-batches of `rows` rows padded to `length`."""
    trainable = trainable_parameters(model, trained)
    return MemoryEstimate(
        weights=_weight_bytes(model, trained, precision),
        gradients=GRAD_BYTES * trainable,
        optimizer=ADAMW_BYTES * trainable,
        activations=round(rows * costs.at(costs.activations, length)),
    )


def trainable_parameters(model: nn.Module, trained: Sequence[str]) -> int:
    names = set(trained)
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def _weight_bytes(model: nn.Module, trained: Sequence[str], precision: str) -> int:
    """Parameters and buffers as the loop holds them (frozen linear weights in bf16 under bf16)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    if precision == "bf16":
        halved = [m.weight for m in frozen_linears(model, set(trained)) if m.weight.dtype == torch.float32]
        total -= sum(w.numel() * 2 for w in {id(w): w for w in halved}.values())
    return total


def peft_sized(model: nn.Module) -> int:
    """Parameters a PEFT method would train on `model`: LoRA of the default rank beside every linear
    layer of its blocks, r x (inputs + outputs) each (0 where it has no blocks of linear layers)."""
    try:
        _, blocks = find_blocks(getattr(model, "backbone", model))
    except ConfigError:
        return 0
    weights = [getattr(m, "weight", None) for m in blocks.modules() if is_linear(m)]
    return sum(PEFT_RANK * (w.shape[0] + w.shape[1]) for w in weights if isinstance(w, torch.Tensor))


@dataclass(frozen=True)
class Lever:
    """A config change that lowers peak memory, and by about how much."""

    setting: str  # what to set, e.g. "train.gradient_checkpointing=true"
    saves_mb: float
    note: str


def levers(
    memory: MemoryEstimate,
    costs: RowCosts,
    *,
    rows: int,
    length: int,
    batch_size: int,
    grad_accum: int,
    checkpointing: bool,
    checkpointing_refused: bool,
    trainable: int,
    peft_trainable: int,
) -> list[Lever]:
    """The changes that would lower this run's peak memory, the largest saving first; only those
    that apply (no checkpointing where no block on the gradient path can be checkpointed, no PEFT
    method where no more weights train than one would train, no shorter rows where cost does not
    grow with length).

    Args:
        peft_trainable: what a PEFT method would train instead (`peft_sized`).
    """
    act = costs.at(costs.activations, length)
    found: list[tuple[str, float, str]] = []  # (setting, bytes saved, note)
    if batch_size > 1:
        half, accum = batch_size // 2, grad_accum * batch_size // (batch_size // 2)
        saves = memory.activations * (1 - min(rows, half) / rows)  # activations scale with the rows
        found.append((f"train.batch_size={half} train.grad_accum={accum}", saves, "the same global batch"))
    if not checkpointing and not checkpointing_refused and costs.checkpointable:
        saves = rows * (act - costs.at(costs.checkpointed_activations, length))
        found.append(("train.gradient_checkpointing=true", saves, "about 30% more compute"))
    if costs.varies() and length > 8:
        shorter = length // 2
        saves = rows * (act - costs.at(costs.activations, shorter))
        found.append((f"data.max_length={shorter}", saves, "longer rows are cut"))
    if trainable > 2 * peft_trainable:
        # frozen weights need neither gradients nor AdamW state
        saves = (GRAD_BYTES + ADAMW_BYTES) * (trainable - peft_trainable)
        found.append(("method.name=lora", saves, "a PEFT method: the pre-trained weights stay frozen"))
    ranked = sorted(found, key=lambda lever: -lever[1])
    return [Lever(setting, round(saves / MB, 1), note) for setting, saves, note in ranked if saves > 0]
