"""Parity: fixed probe inputs through the trained model and through an exported artifact, compared.

A probe is a few held-out rows of the run (its test split, else its validation split, or a file the
user names) encoded exactly as evaluation encodes them. The trained model's fp32 output on them is
the reference: class logits (B, C) for a classifier, next-token logits (B, T, V) for a model that
generates, and for a model that generates text also the greedy continuation of each prompt. An
export passes when its largest logit difference is within the format's stated tolerance, every
predicted label (argmax) is the same, and every greedy generation is identical.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.load import load_splits
from tunesmith.data.templates import resolve_template
from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.eval.answers import encode_prompt, eos_ids
from tunesmith.inference import Trained, prompt_inputs, read_prompts
from tunesmith.models.causal_lm import LMOutput
from tunesmith.models.generate import Sampling, generate_ids

__all__ = [
    "Parity",
    "ParityError",
    "Probe",
    "compare",
    "held_out_rows",
    "make_probe",
    "median_seconds",
    "model_logits",
    "strip_eos",
]


class ParityError(TunesmithError):
    """An exported artifact does not compute what the trained model computes (the message says by how much)."""


@dataclass
class Probe:
    """Held-out rows, as the trained model takes them, and what it gives on them."""

    source: str  # the data file (or split) the rows came from
    inputs: dict[str, torch.Tensor]  # the trained model's keyword inputs: one padded batch
    logits: torch.Tensor  # fp32: (B, C) class logits, or (B, T, V) next-token logits
    mask: torch.Tensor | None = None  # (B, T): the positions of (B, T, V) logits that count
    prompts: list[list[int]] = field(default_factory=list)  # text generators: each prompt's token ids
    generations: list[list[int]] = field(default_factory=list)  # their greedy continuations (no EOS)
    eos: list[int] = field(default_factory=list)
    pad: int = 0
    max_new_tokens: int = 0

    @property
    def rows(self) -> int:
        return int(self.logits.shape[0])


@dataclass
class Parity:
    """How closely an artifact matched the trained model on the probe."""

    rows: int
    max_abs_diff: float
    tolerance: float
    # Share of rows (positions, for token logits) whose argmax is the same, among those the trained
    # model decides: its top logit leads the runner-up by more than 2 x tolerance, so differences the
    # tolerance allows cannot swap them (an exact tie rounded either way is no mismatch).
    labels_equal: float
    generations_equal: bool | None = None  # None where the model does not generate
    note: str = ""  # what the tolerance allows for (dtype, quantization)
    same_argmax_all: float = 1.0  # the same share over every row or position
    decided: tuple[int, int] = (0, 0)  # (rows or positions decided, all of them)

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.labels_equal == 1.0 and self.generations_equal is not False

    def describe(self) -> str:
        text = f"max |logit difference| {self.max_abs_diff:.3g} (tolerance {self.tolerance:g}) over {self.rows} rows"
        text += f", same argmax {self.labels_equal:.1%}"
        if self.decided[0] < self.decided[1]:
            text += f" of the {self.decided[0]} of {self.decided[1]} decided beyond 2x tolerance"
        if self.generations_equal is not None:
            text += f", greedy generations {'identical' if self.generations_equal else 'DIFFERENT'}"
        return text

    def require(self, what: str) -> None:
        """Raise ParityError naming `what` and the measured difference unless the check holds."""
        if not self.ok:
            raise ParityError(f"{what} does not match the trained model: {self.describe()}; nothing was written")

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "max_abs_logit_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "same_argmax": self.labels_equal,
            "same_argmax_all": self.same_argmax_all,
            "decided": list(self.decided),
            "greedy_generations_identical": self.generations_equal,
            "note": self.note,
        }


def make_probe(trained: Trained, data: str | Path | None = None, rows: int = 8, max_new_tokens: int = 16) -> Probe:
    """The probe of a trained run: the first `rows` rows of `data`, else of the run's test split, else
    of its validation split (a fraction of train is split off again exactly as training split it).

    Raises:
        ConfigError: the run has no held-out rows and no `data` was given, or the rows cannot be read.
    """
    cfg, task = trained.config, trained.task
    generates = task.output == "text"

    def read(source: str) -> list[Any]:
        return read_prompts(source, cfg.data) if generates else task.read_examples(source, cfg.data)

    source, examples = _held_out(trained, None if data is None else str(data), read)
    examples = examples[:rows]
    if not examples:
        raise ConfigError(f"{source}: no rows to probe the export with; give another file with --data")
    model = trained.model.eval()
    with torch.no_grad():
        if generates:
            return _text_probe(trained, source, examples, max_new_tokens)
        objective = trained.objective
        items = task.prepare_eval(trained, objective.encode(examples, "eval"), _fp32_runtime(trained))
        inputs = objective.model_inputs(objective.collate(items))
        logits = model_logits(model, inputs)
    mask = None
    if logits.ndim == 3:
        mask = inputs.get("decoder_attention_mask", inputs.get("attention_mask"))
    return Probe(source, inputs, logits, mask)


def held_out_rows(trained: Trained, data: str | Path | None = None) -> tuple[str, list[Any]]:
    """All the rows a probe is taken from, and where they came from: `data`, else the run's test split,
    else its validation split (for measuring an export on more rows than the probe).

    Raises:
        ConfigError: the run has no held-out rows and no `data` was given, or the rows cannot be read.
    """
    cfg, task = trained.config, trained.task

    def read(source: str) -> list[Any]:
        return read_prompts(source, cfg.data) if task.output == "text" else task.read_examples(source, cfg.data)

    return _held_out(trained, None if data is None else str(data), read)


def model_logits(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """A tunesmith model's fp32 logits on its inputs (a causal LM's hidden states projected)."""
    out = model(**inputs)
    if isinstance(out, LMOutput):
        return model.logits(out.hidden)  # type: ignore[operator,no-any-return]
    return out.float()  # type: ignore[no-any-return]


def compare(
    probe: Probe,
    logits: torch.Tensor,
    tolerance: float,
    generations: Sequence[Sequence[int]] | None = None,
    note: str = "",
) -> Parity:
    """Parity of an artifact's `logits` (and greedy `generations`, for text generators) with the probe."""
    want, got = probe.logits.float(), torch.as_tensor(logits).float().reshape(probe.logits.shape)
    if probe.mask is not None and want.ndim == 3:
        keep = probe.mask.bool()
        want, got = want[keep], got[keep]  # (N, V) over the real positions
    if not want.numel():
        return Parity(probe.rows, 0.0, tolerance, 1.0, None, note)
    diff = float((want - got).abs().max())
    agree = want.argmax(-1) == got.argmax(-1)
    if want.shape[-1] > 1:
        top = want.topk(2, dim=-1).values
        decided = (top[..., 0] - top[..., 1]) > 2 * max(tolerance, 0.0)
    else:  # one output (a score): nothing to rank
        decided = torch.ones_like(agree)
    same = float(agree[decided].float().mean()) if bool(decided.any()) else 1.0
    equal = None
    if probe.prompts:
        equal = [list(g) for g in generations or []] == probe.generations
    counts = (int(decided.sum()), int(decided.numel()))
    return Parity(probe.rows, diff, tolerance, same, equal, note, float(agree.float().mean()), counts)


def median_seconds(fn: Callable[[], Any], repeats: int = 5) -> float:
    """Median wall time of `fn()` over `repeats` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def greedy(model: Any, prompt: list[int], probe: Probe) -> list[int]:
    """A transformers (or peft) model's greedy continuation of `prompt`, as the probe's were made: one
    prompt at a time, no padding, no repetition penalty, cut at the first EOS."""
    ids = torch.tensor([prompt])
    new = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=probe.max_new_tokens,
        do_sample=False,
        num_beams=1,
        repetition_penalty=1.0,
        eos_token_id=probe.eos or None,
        pad_token_id=probe.pad,
    )
    return strip_eos(new[0, len(prompt) :].tolist(), probe.eos)


def strip_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    """A generated continuation up to (not including) its first end-of-sequence token."""
    out = []
    for token in ids:
        if token in eos:
            break
        out.append(int(token))
    return out


def _text_probe(trained: Trained, source: str, examples: list[Any], max_new_tokens: int) -> Probe:
    tokenizer: Any = trained.objective.tokenizer
    template = resolve_template(tokenizer, trained.config.data.template)
    from tunesmith.inference import _message  # the same rendering generate uses

    rendered = [p if isinstance(p, str) else tuple(_message(m) for m in p) for p in prompt_inputs(examples)]
    prompts = [list(encode_prompt(p, tokenizer, template)) for p in rendered]  # type: ignore[arg-type]
    eos = list(eos_ids(tokenizer, trained.model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model: Any = trained.model
    sampling = Sampling(max_new_tokens=max_new_tokens)
    generations = [strip_eos(generate_ids(model, [p], eos, sampling, pad)[0], eos) for p in prompts]
    sequences = [p + g for p, g in zip(prompts, generations, strict=True)]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    inputs = {"input_ids": ids, "attention_mask": mask}
    logits = model_logits(model, inputs)
    return Probe(source, inputs, logits, mask, prompts, generations, eos, int(pad), max_new_tokens)


def _held_out(trained: Trained, data: str | None, read: Callable[[str], list[Any]]) -> tuple[str, list[Any]]:
    if data is not None:
        return data, read(data)
    cfg = trained.config
    if cfg.data.test is None and cfg.data.validation is None:
        raise ConfigError(
            f"{trained.where}: the run has no held-out rows (data.test, data.validation) to probe the export "
            "with; give a file with --data FILE"
        )
    splits = load_splits(cfg.data, cfg.train.seed, read, labelled=False)
    if splits.test:
        return str(cfg.data.test), splits.test
    name = cfg.data.validation if isinstance(cfg.data.validation, str) else f"{cfg.data.train} (validation split)"
    return str(name), splits.validation or []


def _fp32_runtime(trained: Trained) -> Any:
    from tunesmith.runtime import make_runtime

    cfg = trained.config
    return make_runtime(cfg.train.model_copy(update={"precision": "fp32"}), cfg.eval, trained.model)
