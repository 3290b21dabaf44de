"""Kernel choices measured where they run: which attention kernel a causal LM trains with, how many
tokens its losses project through the output layer at a time, and which dropout kernel every model
trains with, decided by a short probe on this machine at the run's shape class, kept per machine
(`cache_root()/kernels.json`) and recorded in plan.json (`kernels`).

No rule measured on one machine decides: on a 2-core AMD EPYC with AVX-512 BF16, matmul-softmax
attention ("eager") beat torch's fused kernel ("sdpa") in SmolLM2 LoRA steps up to ~512 tokens; on
a 2-core Xeon without fast bf16 the fused kernel was faster and leaner at every length from 64 to
512 tokens (8 x 512: 129 vs 320 ms and 44 vs 99 MB saved per layer). Likewise the dropout that
draws 15-bit lanes from 64-bit words (training/dropout.py) beat torch's per-element Bernoulli draw
by ~10x on CPUs, which a GPU need not repeat.

Each probe times a forward and backward pass of the kernel alone on random inputs of the run's
shape class (one warm-up call each, then the median of 5 calls, the kernels taking turns), and
counts the bytes autograd saves for the backward pass. The faster kernel is chosen, unless the
other saves less memory and is at most 10% slower. A probe costs about half a second at 8 x 256
tokens and 2.5 s at 8 x 512 on a 2-core EPYC; only the first run of a shape class on a machine
pays it.

The losses' chunk (losses/lm.py) trades speed for memory: a chunk of c tokens holds c x vocab
logits at a time, overwritten by their gradient (1,024 x 49,152 in bf16: 96 MB), while small chunks run the
output layer's matmul and softmax less efficiently. On a 2-core AMD EPYC (sharing its cores with a
benchmark), SmolLM2's output layer took 1.37 ms a token in 256-token chunks against 1.08 at 1,024
under bf16, and 1.98 against 1.61 at 2,048 in fp32. The probe runs one chunk of each candidate size
(256 to 4,096 tokens, up to the first that holds the run's largest micro-batch whole; no probe when
the smallest does), forward and backward, the faster of two runs after one warm-up, and compares
time per token; the transient logits are the memory. For SmolLM2 with candidates up to 2,048 it
took 8.8 s (bf16) and 13.0 s (fp32) on that machine, once per machine and shape class.

Conv nets (images) train on channels-last memory where oneDNN's convolutions run faster on it
(EfficientNet-Lite0 on a 2-core CPU: a training step twice as fast); the probe runs the model's
own forward and backward pass on random images of the run's size, in both layouts (the run's batch,
at most 16 images of 64 px and fewer for larger ones: about 3.5 s in fp32 on a 2-core EPYC),
leaving its weights, statistics and gradients as they were.

Models that train through an attention with dropout (BERT-family encoders: 0.1) and load with
torch's fused kernel get that kernel's unfused fallback, which keeps three (query x key) tensors a
layer for the backward pass; the probe times it against the attention of training/attention.py,
which keeps none, on the run's batch, heads, longest row and dropout, in the projections' dtype.

Shape classes (counted in the rows a training pass runs: `pass_shape`): attention by batch size,
heads, key-value heads, head size, the longest training row rounded up to a power of two (where
memory peaks; the probe weighs each kernel's saved bytes there) and the length below which half of
the training tokens lie, rounded likewise (where the epoch's time goes; the probe times the kernels
there too where it is shorter); the loss chunk by the output layer's shape, whether it trains, and
the largest candidate that fits a micro-batch; the memory format by the backbone's class and size,
the images probed and their size; dropout by the elements of one batch's hidden states, rounded up
to a power of two.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.machine import machine_key, remembered
from tunesmith.models.causal_lm import base_decoder
from tunesmith.runtime import Runtime, trial_steps
from tunesmith.training.attention import ATTENTION, additive, dropped_attention
from tunesmith.training.attention import register as register_attention
from tunesmith.training.dropout import fast_dropout, use_fast_dropout

__all__ = ["LOSS_CHUNKS", "MEMORY_FORMATS", "choose_kernels", "measure_kernels", "pass_shape", "pick", "saved_bytes"]

SLOWER_BUT_LEANER = 1.10  # the leaner kernel wins if it is at most this much slower
PROBE_ROUNDS = 5  # timed calls of each kernel, taking turns, after one warm-up call each
PROBE_REVISION = "r2"  # changes with how `_probe` times, so that choices timed the older way are measured again
LOSS_CHUNKS = (256, 512, 1024, 2048, 4096)  # candidate tokens per chunk of logits
LOSS_REVISION = "r2"  # changes with losses/lm.py's kernel, so that a choice timed on an older one is measured again
LAYOUT_PIXELS = 16 * 64 * 64  # pixels a memory-format probe runs, at most (the run's batch, fewer where large)
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}
_FILE = "kernels.json"


def choose_kernels(
    model: nn.Module,
    lengths: Sequence[int],
    batch_size: int,
    runtime: Runtime,
    recorded: dict[str, Any] | None = None,
    agree: Callable[[Any], Any] = lambda x: x,
) -> dict[str, Any]:
    """Measure (or recall) the kernels for this run's shapes and apply them to `model` in place.

    `recorded` is the plan.json record of a run being resumed: its choices are applied again
    unmeasured, so a resumed run computes as it began. `agree` makes every process use the same
    choice (the rank-0 broadcast of a multi-process run). Returns the record for plan.json.
    """
    chosen = recorded if recorded is not None else agree(measure_kernels(model, lengths, batch_size, runtime))
    if chosen.get("dropout", {}).get("choice") == "fast":
        use_fast_dropout(model)
    attention = chosen.get("attention", {}).get("choice")
    if attention is not None:
        _set_attention(model, attention)
    layout = chosen.get("memory_format", {}).get("choice")
    if layout is not None and callable(getattr(model, "use_memory_format", None)):
        model.use_memory_format(MEMORY_FORMATS[layout])  # type: ignore[operator]
    chunk = chosen.get("loss_chunk", {}).get("choice")
    if chunk is not None and hasattr(model, "loss_chunk"):
        setattr(model, "loss_chunk", int(chunk))  # noqa: B010 (a CausalLM's attribute, read by its forward)
    return chosen


def pass_shape(objective: Any, items: Sequence[Any], batch_size: int) -> tuple[list[int], int]:
    """The row lengths and the rows of one training pass that the probes measure at: an item may
    become several rows (`rows_per_item`: DPO's chosen and rejected sequences, RL's group of samples)
    longer than the item (`row_length`: RL's prompt and completion).

    Probed at the items per step instead, a DPO run of 4 pairs measured attention at 4 rows and an RL
    run of 2 prompts x 4 samples at 2, where its passes ran 8: at 2 x 512 tokens eager attention
    measured faster (23 against 30 ms), at 8 x 512 it takes twice sdpa's time and keeps 5.5 times its
    bytes (SmolLM2 RL at 512 tokens peaked at 1.5x the SFT run's memory)."""
    row_length = getattr(objective, "row_length", objective.length)
    return [int(row_length(item)) for item in items], batch_size * int(getattr(objective, "rows_per_item", 1))


def measure_kernels(model: nn.Module, lengths: Sequence[int], batch_size: int, runtime: Runtime) -> dict[str, Any]:
    """The probes that apply to `model` (attention: a causal LM whose `model.attention` is auto;
    loss chunk: a causal LM whose micro-batches hold more tokens than the smallest chunk; memory
    format: an image conv net whose backbone trains; dropout: any model with a dropout that trains),
    each with its timings and choice."""
    record: dict[str, Any] = {}
    longest = max(lengths, default=1)
    config = _hf_config(model)
    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 512)
    if any(type(m) is nn.Dropout and m.p > 0 for m in model.modules()):
        numel = _bucket(batch_size * longest * hidden)
        key = f"dropout {PROBE_REVISION}|{numel} elements|{runtime.precision}|{machine_key(runtime.device.type)}"
        record["dropout"] = remembered(key, lambda: _probe_dropout(numel, runtime), _FILE)
    dropping = _attention_dropout(model, config)
    if dropping > 0:
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        dims = (batch_size, heads, _bucket(longest), head_dim)
        key = (
            f"attention-dropout {PROBE_REVISION}|"
            + "b{} h{} t{} d{}".format(*dims)
            + f" p{dropping}|{runtime.precision}|{machine_key(runtime.device.type)}"
        )
        record["attention"] = remembered(key, lambda: _probe_dropped_attention(dims, dropping, runtime), _FILE)
    if getattr(model, "attention_request", None) == "auto" and config is not None:
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        shape = (batch_size, heads, kv_heads, _bucket(longest), head_dim)
        typical = min(_bucket(_half_the_tokens(lengths)), shape[3])
        key = (
            f"attention {PROBE_REVISION}|"
            + "b{} h{} kv{} t{} d{}".format(*shape)
            + f" timed at t{typical}|{runtime.precision}|{machine_key(runtime.device.type)}"
        )
        record["attention"] = remembered(key, lambda: _probe_attention_where_it_counts(shape, typical, runtime), _FILE)
    if _layout_matters(model):
        size = int(getattr(model, "input_size"))  # noqa: B009
        rows = max(1, min(batch_size, LAYOUT_PIXELS // size**2))  # 16 images of 64 px, 1 of 224 px
        params = sum(p.numel() for p in model.parameters())
        key = (
            f"memory-format|{type(getattr(model, 'backbone', model)).__name__} {params} params|b{rows} s{size}"
            f"|{runtime.precision}|{machine_key(runtime.device.type)}"
        )
        record["memory_format"] = remembered(key, lambda: _probe_layout(model, rows, size, runtime), _FILE)
    head = getattr(model, "lm_head", None)
    tokens = batch_size * longest  # at most, in one micro-batch
    candidates = [c for c in LOSS_CHUNKS if c < tokens] + [c for c in LOSS_CHUNKS if c >= tokens][:1]
    if hasattr(model, "loss_chunk") and isinstance(head, nn.Linear) and len(candidates) > 1:
        weight = head.weight
        vocab, width = weight.shape
        trains = "trained" if weight.requires_grad else "frozen"
        key = (
            f"loss-chunk {LOSS_REVISION}|v{vocab} h{width} {trains} up to {candidates[-1]}"
            f"|{runtime.precision}|{machine_key(runtime.device.type)}"
        )
        record["loss_chunk"] = remembered(
            key, lambda: _probe_loss_chunk(candidates, vocab, width, weight.requires_grad, runtime), _FILE
        )
    return record


def pick(timings: dict[str, dict[str, float]], time: str = "ms", memory: str = "saved_mb") -> str:
    """The kernel to use from {name: {"ms": time, "saved_mb": memory}} (or the `time` and `memory`
    keys named): the fastest, unless another needs less memory and is at most `SLOWER_BUT_LEANER`
    times slower."""
    fastest = min(timings, key=lambda k: timings[k][time])
    leaner = [
        k
        for k in timings
        if timings[k][memory] < timings[fastest][memory]
        and timings[k][time] <= SLOWER_BUT_LEANER * timings[fastest][time]
    ]
    return min(leaner, key=lambda k: timings[k][memory]) if leaner else fastest


def saved_bytes(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """`fn()` and the bytes autograd saved for its backward pass (each storage counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def _probe(
    kernels: dict[str, Callable[[], torch.Tensor]],
    runtime: Runtime,
    prepare: Callable[[str], None] = lambda name: None,
) -> dict[str, Any]:
    """Forward + backward of each kernel: median ms of `PROBE_ROUNDS` after a warm-up, and MB saved.

    The kernels take turns, one call each a round, in the opposite order every other round, so that
    what slows a machine for a while (another process, the allocator's first touches of a size)
    falls on every kernel alike. Timed one after the other, the first kernel's calls in a fresh
    process had run at half speed: eager attention at 8 x 256 tokens measured 36 ms in the first
    probe of a process and 18 ms in the next, and a SmolLM2 run at 8 x 512 tokens kept eager
    attention (85 against 120 ms) where, measured again on the idle machine, it took twice sdpa's
    time (231 against 104 ms) and saved 5.5 times its bytes. `prepare(name)` runs before each call
    of kernel `name`, untimed (the layout probe lays the model out there).
    """
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    times: dict[str, list[float]] = {name: [] for name in kernels}
    saved: dict[str, int] = {}
    names = list(kernels)
    with torch.random.fork_rng(devices=[runtime.device] if runtime.device.type == "cuda" else []):
        # the global RNG is left as it was: a run draws the same numbers whether or not this probe ran
        for turn in range(PROBE_ROUNDS + 1):  # round 0 warms each kernel up and is not counted
            for name in names if turn % 2 == 0 else reversed(names):
                prepare(name)
                seconds, saved[name] = _time(kernels[name], runtime, sync)
                if turn:
                    times[name].append(seconds)
    timings = {
        name: {"ms": round(statistics.median(times[name]) * 1e3, 2), "saved_mb": round(saved[name] / 2**20, 2)}
        for name in names
    }
    return {"choice": pick(timings), "measured": timings, "probe_seconds": round(time.perf_counter() - started, 3)}


def _time(kernel: Callable[[], torch.Tensor], runtime: Runtime, sync: Callable[[], None]) -> tuple[float, int]:
    """Seconds of one forward + backward call of `kernel`, and the bytes its forward pass saved."""
    sync()
    start = time.perf_counter()
    with runtime.autocast():
        out, saved = saved_bytes(kernel)
    out.float().sum().backward()
    sync()
    return time.perf_counter() - start, saved


def _probe_attention(shape: tuple[int, int, int, int, int], runtime: Runtime) -> dict[str, Any]:
    """eager (as transformers' eager attention: scores, additive mask, fp32 softmax, weighted sum)
    against sdpa (torch's fused kernel with a boolean mask), on a causal mask, key-value heads
    repeated to the query heads as both of transformers' paths do."""
    batch, heads, kv_heads, length, head_dim = shape
    device = runtime.device
    generator = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, length, head_dim, device=device, generator=generator).requires_grad_()
    k, v = (
        torch.randn(batch, kv_heads, length, head_dim, device=device, generator=generator).requires_grad_()
        for _ in range(2)
    )
    allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None].expand(batch, 1, -1, -1)
    additive = torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)
    groups = heads // kv_heads

    def eager() -> torch.Tensor:
        keys, values = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        scores = q @ keys.transpose(-1, -2) * head_dim**-0.5 + additive
        return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ values

    def sdpa() -> torch.Tensor:
        keys, values = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed)

    return _probe({"eager": eager, "sdpa": sdpa}, runtime)


def _probe_attention_where_it_counts(
    shape: tuple[int, int, int, int, int], typical: int, runtime: Runtime
) -> dict[str, Any]:
    """The attention probe, weighing each kernel's memory at the longest rows (where the peak is)
    and its time at `typical` tokens (where the epoch's time goes) when most rows are shorter.

    Timed at the longest row alone, a run of short rows took the kernel that is faster only at its
    few longest batches: SmolLM2 LoRA on 256 instruction rows of 70 tokens on average (longest
    256; batch 8, bf16, 2-core EPYC) trained its epoch in 39-45 s with eager attention and 45-55 s
    with sdpa, while the two kernels timed alike at 8 x 256 (37 and 38 ms) and eager won by half
    at 8 x 128 (12 against 24 ms)."""
    longest = _probe_attention(shape, runtime)
    if typical >= shape[3]:
        return longest
    at_typical = _probe_attention((*shape[:3], typical, shape[4]), runtime)
    timings = {
        name: {"ms": at_typical["measured"][name]["ms"], "saved_mb": longest["measured"][name]["saved_mb"]}
        for name in longest["measured"]
    }
    return {
        "choice": pick(timings),
        "measured": timings,
        "timed_at_tokens": typical,
        "at_longest": longest["measured"],
        "probe_seconds": round(longest["probe_seconds"] + at_typical["probe_seconds"], 3),
    }


def _half_the_tokens(lengths: Sequence[int]) -> int:
    """The row length below which half of the training tokens lie (rows are batched by length, so
    it is the padded length of the batches that hold the middle token)."""
    total, running = sum(lengths), 0
    for n in sorted(lengths):
        running += n
        if 2 * running >= total:
            return n
    return 1


def _attention_dropout(model: nn.Module, config: Any) -> float:
    """The attention dropout of a model whose attention could run as `ATTENTION` instead of torch's
    fused kernel: a Hugging Face model loaded with "sdpa" (which falls back to its unfused form when
    it drops) that trains through its attention, with no attention kernel asked for (encoders; a
    causal LM's `model.attention` is its own probe). 0 where none of this holds."""
    if config is None or getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION):
        return 0.0
    if getattr(model, "attention_request", None) is not None or not hasattr(config, "num_attention_heads"):
        return 0.0
    backbone = getattr(model, "backbone", model)
    if not any(p.requires_grad for p in backbone.parameters()):
        return 0.0  # a frozen backbone runs its attention without gradients: torch's kernel, undropped
    p = getattr(config, "attention_probs_dropout_prob", None)
    return float(p if p is not None else getattr(config, "attention_dropout", 0.0) or 0.0)


def _probe_dropped_attention(shape: tuple[int, int, int, int], p: float, runtime: Runtime) -> dict[str, Any]:
    """sdpa (torch's kernel; with dropout on a CPU its unfused form) against `ATTENTION`
    (training/attention.py), at dropout `p`, on a padding mask (a quarter of the keys of every
    other row masked), with query, key and value in the dtype the projections give them."""
    batch, heads, length, head_dim = shape
    device = runtime.device
    dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(batch, heads, length, head_dim, device=device, generator=generator).to(dtype).requires_grad_()
        for _ in range(3)
    )
    allowed = torch.ones(batch, 1, length, length, dtype=torch.bool, device=device)
    allowed[::2, :, :, length - length // 4 :] = False
    bias = additive(allowed)
    scale = head_dim**-0.5

    def sdpa() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p, scale=scale)

    def lean() -> torch.Tensor:
        return dropped_attention(q, k, v, bias, p, scale)

    return _probe({"sdpa": sdpa, ATTENTION: lean}, runtime)


def _probe_dropout(numel: int, runtime: Runtime) -> dict[str, Any]:
    """torch's dropout against the 15-bit-lane one (training/dropout.py) at p = 0.1."""
    # its own generator: a draw from the global RNG here made a machine's first run (which measures)
    # train differently from its later runs (which recall the choice): 0.964 against 0.954 accuracy
    generator = torch.Generator(device=runtime.device).manual_seed(0)
    x = torch.randn(numel // 1024, 1024, device=runtime.device, generator=generator).requires_grad_()
    return _probe({"torch": lambda: F.dropout(x, 0.1, True), "fast": lambda: fast_dropout(x, 0.1)}, runtime)


def _probe_loss_chunk(
    candidates: list[int], vocab: int, width: int, weight_trains: bool, runtime: Runtime
) -> dict[str, Any]:
    """One chunk of each candidate size through `losses.lm.linear_cross_entropy`, forward and
    backward (the output layer's gradient too where it trains): ms per 1,024 tokens (the faster of
    two runs, after one warm-up run of the smallest), and the logits and their gradient a chunk
    holds (MB)."""
    from tunesmith.losses.lm import linear_cross_entropy

    device = runtime.device
    generator = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(vocab, width, device=device, generator=generator) * 0.02).requires_grad_(weight_trains)
    logit_bytes = 2 if runtime.precision == "bf16" else 4  # the logits, overwritten by their gradient
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def seconds(chunk: int) -> float:
        hidden = torch.randn(chunk, width, device=device, generator=generator).requires_grad_()
        targets = torch.randint(0, vocab, (chunk,), device=device, generator=generator)
        sync()
        start = time.perf_counter()
        with runtime.autocast():
            loss = linear_cross_entropy(hidden, weight, targets, chunk)
        loss.backward()
        sync()
        return time.perf_counter() - start

    started = time.perf_counter()
    measured: dict[str, dict[str, float]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        seconds(candidates[0])  # warm-up
        for chunk in candidates:
            best = min(seconds(chunk), seconds(chunk))
            measured[str(chunk)] = {
                "ms_per_1k_tokens": round(best * 1e3 * 1024 / chunk, 2),
                "logits_mb": round(chunk * vocab * logit_bytes / 2**20, 1),
            }
    return {
        "choice": int(pick(measured, "ms_per_1k_tokens", "logits_mb")),
        "measured": measured,
        "probe_seconds": round(time.perf_counter() - started, 3),
    }


def _layout_matters(model: nn.Module) -> bool:
    """An image conv net that knows its input size, whose backbone trains (a frozen backbone's
    work is cached before training, in whatever layout)."""
    backbone = getattr(model, "backbone", None)
    return (
        callable(getattr(model, "use_memory_format", None))
        and getattr(model, "input_size", None) is not None
        and bool(getattr(model, "has_spatial_convs", lambda: False)())
        and backbone is not None
        and any(p.requires_grad for p in backbone.parameters())
    )


def _probe_layout(model: nn.Module, rows: int, size: int, runtime: Runtime) -> dict[str, Any]:
    """A training step's forward and backward pass of `model` itself on `rows` random images of
    `size` pixels, channels-last against contiguous (NCHW) weights and inputs. The model's weights,
    batch-norm statistics, gradients and layout are as they were afterwards."""
    device = runtime.device
    pixels = torch.randn(rows, 3, size, size, device=device, generator=torch.Generator(device=device).manual_seed(0))

    def lay_out(name: str) -> None:  # the kernels take turns: the weights change layout between calls
        if getattr(model, "memory_format", None) != MEMORY_FORMATS[name]:
            model.use_memory_format(MEMORY_FORMATS[name])  # type: ignore[operator]

    def step() -> torch.Tensor:
        return model(pixel_values=pixels)  # type: ignore[no-any-return]

    with trial_steps(model):
        return _probe(dict.fromkeys(MEMORY_FORMATS, step), runtime, lay_out)


def _hf_config(model: nn.Module) -> Any:
    return getattr(base_decoder(getattr(model, "backbone", model)), "config", None)


def _set_attention(model: nn.Module, kernel: str) -> None:
    base = base_decoder(getattr(model, "backbone", model))
    if kernel == ATTENTION:
        register_attention()
    setter = getattr(base, "set_attn_implementation", None)
    if callable(setter) and getattr(base.config, "_attn_implementation", kernel) != kernel:
        setter(kernel)


def _bucket(n: int) -> int:
    """n rounded up to a power of two (at least 16)."""
    return 1 << max(4, math.ceil(math.log2(max(n, 1))))
