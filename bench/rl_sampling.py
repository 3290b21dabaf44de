"""Benchmark: RL group sampling, tunesmith's generation against transformers' `generate`.

The workload of one RL step: P prompts from the packaged review set, each sampled G times
(temperature 1, top-p 1), exactly `--new-tokens` new tokens per completion (no early stop, so both
sides do the same work), on the packaged SmolLM2-135M-Instruct in fp32, or with `--precision bf16`
(or `auto`, what `precision: auto` picks on this machine) both sides under bf16 autocast, with
tunesmith's frozen linear weights kept in bf16 as its training loop keeps them. tunesmith runs
`models.generate.generate_ids` as the RL task calls it (prompts repeated G times); the reference
runs `AutoModelForCausalLM.generate(do_sample=True, num_return_sequences=G)` on the same prompts,
left-padded, with its default dynamic KV cache. Both in one process, alternating, one warm-up
each, then the median of `--repeats`. With `--lora R`, both models carry the same LoRA adapters
(rank R on every block linear, through peft, B matrices drawn non-zero), as an RL policy trained
with `method: lora` does.

Run: `python bench/rl_sampling.py [--prompts 1] [--group 16] [--new-tokens 40] [--repeats 5] [--lora 8]
[--precision fp32|bf16|auto]`;
prints a Markdown table and writes bench/results/rl-sampling-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from harness import describe_machine

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=1)
    parser.add_argument("--group", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lora", type=int, default=0, help="LoRA rank on both sides (0: no adapters)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.config import ModelConfig
    from tunesmith.models.generate import Sampling, generate_ids
    from tunesmith.models.load import build_causal_lm, resolve_model_path
    from tunesmith.runtime import resolve_precision
    from tunesmith.training.loop import frozen_matmuls_to_bf16
    from tunesmith.zoo import packaged_data_rows

    path = resolve_model_path("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [row for row, _ in packaged_data_rows("rotten-tomatoes")][: args.prompts]
    texts = [f"Write a short review of the movie {r['movie'].replace('_', ' ')}." for r in rows]
    rendered = [
        tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False)
        for t in texts
    ]
    prompts = [list(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in rendered]
    ours = build_causal_lm(ModelConfig(name="smollm2-135m"), 512).eval()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if args.lora:
        _add_lora(ours, reference, args.lora)
    precision = resolve_precision(args.precision, ours)
    bf16 = precision == "bf16"
    if bf16:  # as the training loop keeps them (with LoRA: the frozen base weights)
        frozen_matmuls_to_bf16(ours, {name for name, p in ours.named_parameters() if p.requires_grad})
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    g, n = args.group, args.new_tokens

    def run_ours(seed: int) -> int:
        repeated = [p for p in prompts for _ in range(g)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = generate_ids(ours, repeated, [], Sampling(n, 1.0, 1.0, seed), pad)
        return sum(len(o) for o in out)

    def run_reference(seed: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        torch.manual_seed(seed)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = reference.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=g,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=pad,
            )
        return int((out.shape[1] - width) * out.shape[0])

    times: dict[str, list[float]] = {"tunesmith": [], "reference": []}
    tokens: dict[str, int] = {}
    runners = {"tunesmith": run_ours, "reference": run_reference}
    for fn in runners.values():  # warm-up
        fn(0)
    for repeat in range(args.repeats):
        order = list(runners) if repeat % 2 == 0 else list(reversed(runners))
        for name in order:
            start = time.perf_counter()
            tokens[name] = runners[name](repeat + 1)
            times[name].append(time.perf_counter() - start)
    machine = describe_machine()
    result = {
        "machine": machine,
        "workload": {
            "lora_rank": args.lora,
            "precision": precision,
            "prompts": args.prompts,
            "group": g,
            "new_tokens": n,
            "prompt_tokens": [len(p) for p in prompts],
        },
        "seconds": times,
        "tokens": tokens,
    }
    medians = {k: statistics.median(v) for k, v in times.items()}
    rate = {k: tokens[k] / medians[k] for k in medians}
    adapters = (f", LoRA r{args.lora}" if args.lora else "") + f", {precision}"
    print(
        f"{machine['cpu']} (BF16: {machine['bf16']}), {args.prompts} prompt(s) x {g} samples x {n} new tokens{adapters}"
    )
    print("| tool | seconds | tokens/s | vs reference |\n|---|---:|---:|---:|")
    for k in ("tunesmith", "reference"):
        print(f"| {k} | {medians[k]:.2f} | {rate[k]:.0f} | {rate[k] / rate['reference']:.2f}x |")
    RESULTS.mkdir(exist_ok=True)
    name = f"rl-sampling{'-lora' if args.lora else ''}{'-bf16' if bf16 else ''}"
    (RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(result, indent=2))
    return 0


def _add_lora(ours: Any, reference: Any, rank: int) -> None:
    """The same adapters on both sides: tunesmith's LoRA method on ours, peft on the reference's
    decoder, with identical non-zero B matrices (untrained adapters add nothing)."""
    import peft
    import torch

    from tunesmith.methods.lora import LoraConfig, LoraMethod
    from tunesmith.methods.targets import lora_targets

    targets = lora_targets(ours.backbone, None, rank, "bench")
    LoraMethod(LoraConfig(r=rank, alpha=2 * rank, dropout=0.05)).apply(ours)
    reference.model = peft.get_peft_model(
        reference.model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=targets)
    )
    theirs = dict(reference.model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in ours.backbone.named_parameters():
            if "lora_" in name:
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
                theirs[name].copy_(param)
    ours.eval()
    reference.eval()


if __name__ == "__main__":
    raise SystemExit(main())
