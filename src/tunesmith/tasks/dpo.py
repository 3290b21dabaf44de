"""Direct preference optimisation: tune a causal LM on preference pairs, against the frozen base
model as the reference (Rafailov et al. 2023; IPO, SimPO and label smoothing as `dpo.loss_type`).

The reference never changes, so its log-probabilities are frozen work: they are computed once,
before the first step, with the model as it starts (peft adapters switched off, so prompt and
prefix tuning start from the base too), and kept with each pair. No second copy of the model is
held, whatever the method, and a step costs one forward and backward pass of the policy. A batch
holds the B chosen sequences, then the B rejected ones; only response tokens (and the EOS) are
scored, through `token_logprobs`, which never holds (tokens, vocab) logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from tunesmith.config import DataConfig, Section
from tunesmith.data.load import Splits, read_preference_examples
from tunesmith.data.preferences import PreferenceExample, encode_pairs
from tunesmith.data.quality import QualityReport
from tunesmith.data.quality.pairs import check_pair_file
from tunesmith.eval.evaluate import eval_batches
from tunesmith.eval.metrics import PreferenceMetrics
from tunesmith.inference import base_model
from tunesmith.losses.lm import IGNORE, token_logprobs
from tunesmith.losses.preference import dpo_loss, sequence_sums
from tunesmith.models.anatomy import adapters_off
from tunesmith.models.causal_lm import LMOutput
from tunesmith.plugins import Method
from tunesmith.registry import register_task
from tunesmith.runtime import Runtime
from tunesmith.tasks.base import BaseObjective, BaseTask, build_lm, refuse_head_only
from tunesmith.training.batching import padded_width

__all__ = ["DpoConfig", "DpoObjective", "DpoTask"]

Item = dict[str, Any]


class DpoConfig(Section):
    """Direct preference optimisation against the frozen base model as the reference."""

    beta: float = Field(0.1, gt=0.0, description="KL strength: how far the policy may move from the reference.")
    loss_type: Literal["sigmoid", "ipo", "simpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, or simpo (reference-free, length-normalised)."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="Assumed share of flipped preference labels (cDPO; sigmoid and simpo)."
    )
    gamma: float = Field(0.5, ge=0.0, description="simpo: target reward margin.")


@register_task("dpo")
class DpoTask(BaseTask):
    """Preference pairs -> a causal LM that prefers the chosen responses (DPO, IPO, SimPO)."""

    name = "dpo"
    summary = "a causal LM tuned on preference pairs"
    section = DpoConfig
    headline = ("accuracy", "margin")
    output = "text"
    retention_metrics = ("accuracy",)

    def read_examples(self, source: str, data: DataConfig, targets: bool = True) -> list[PreferenceExample]:
        return read_preference_examples(source, data)

    def check_data(
        self, source: str, references: Sequence[str], data: DataConfig, tokenizer: Any | None
    ) -> QualityReport:
        return check_pair_file(source, references, data, self.name)

    def check_method(self, method: Method) -> None:
        refuse_head_only(method)

    def build_model(self, num_labels: int) -> nn.Module:
        return build_lm(self.cfg)

    def objective(self, tokenizer: Any | None, labels: Sequence[str]) -> DpoObjective:
        d = self.cfg.data
        return DpoObjective(tokenizer, d.max_length, self.cfg.section(self.name), d.template, d.overlong)

    def prepare(
        self,
        objective: Any,
        model: nn.Module,
        runtime: Runtime,
        splits: Splits,
        train_items: list[Item],
        val_items: list[Item] | None,
    ) -> tuple[list[Item], list[Item] | None]:
        """The reference's log-probabilities of every pair (train, validation and test), computed once
        with the model as it starts, in the kernels it trains with (api._encode applies them first).

        Its batches hold no more pairs than a training step: where the measured kernel is eager
        attention, a batch keeps (rows x heads x length x length) scores in fp32 for each layer in
        turn, 2.4 GB for 128 rows of 512 tokens; a training step's batch is known to fit.
        """
        runtime = replace(runtime, eval_batch_size=min(runtime.eval_batch_size, self.cfg.train.batch_size))
        train_items = objective.add_reference(model, train_items, runtime)
        if val_items is not None:
            val_items = objective.add_reference(model, val_items, runtime)
        if splits.test:
            objective.add_reference(model, objective.encode(splits.test, "test"), runtime)
        return train_items, val_items

    def prepare_eval(self, trained: Any, items: list[Item], runtime: Runtime) -> list[Item]:
        """The reference for evaluating a trained run: its peft adapter switched off where it has
        one, else the base model built afresh."""
        return trained.objective.add_reference(base_model(trained), items, runtime)  # type: ignore[no-any-return]


class DpoObjective(BaseObjective):
    default_metric = "loss"
    rows_per_item = 2  # the chosen and the rejected sequence

    def __init__(
        self, tokenizer: Any, max_length: int, cfg: DpoConfig, template: str = "auto", overlong: str = "truncate"
    ) -> None:
        super().__init__(tokenizer)
        self.max_length = max_length
        self.cfg = cfg
        self.template = template
        self.overlong = overlong
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        # (chosen ids, rejected ids) -> the reference's summed log-probabilities of both responses
        self.reference: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[float, float]] = {}

    @property
    def needs_reference(self) -> bool:
        return self.cfg.loss_type != "simpo"

    def encode(
        self, examples: Sequence[PreferenceExample], split: str = "train", pack_rows: bool = False
    ) -> list[Item]:
        """Both sides of each pair with their scored tokens (and the reference's log-probabilities,
        once `add_reference` has computed them for these pairs)."""
        pairs, counts = encode_pairs(examples, self.tokenizer, self.template, self.max_length, self.overlong)  # type: ignore[arg-type]
        self.counts[split] = counts
        items = []
        for chosen, rejected in pairs:
            item: Item = {"chosen": chosen.input_ids, "chosen_targets": chosen.targets}
            item.update(rejected=rejected.input_ids, rejected_targets=rejected.targets)
            known = self.reference.get(_key(item))
            if known is not None:
                item["reference"] = known
            items.append(item)
        return items

    @torch.no_grad()
    def add_reference(self, model: Any, items: list[Item], runtime: Runtime) -> list[Item]:
        """Items with the reference's log-probabilities of both responses, computed with `model` as the
        reference (in eval mode, any peft adapter switched off); remembered for later encodes."""
        missing = [i for i, it in enumerate(items) if "reference" not in it]
        if not self.needs_reference or not missing:
            return items
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        try:
            with adapters_off(model):
                for ids in eval_batches([self.length(items[i]) for i in missing], runtime.eval_batch_size):
                    batch = {k: v.to(device) for k, v in self.collate([items[missing[j]] for j in ids]).items()}
                    with runtime.autocast():
                        chosen, rejected, _ = self.sequence_logps(model(**self.model_inputs(batch)), batch)
                    for j, c, r in zip(ids, chosen.tolist(), rejected.tolist(), strict=True):
                        item = items[missing[j]]
                        item["reference"] = (c, r)
                        self.reference[_key(item)] = (c, r)
        finally:
            model.train(was_training)
        return items

    @staticmethod
    def length(item: Item) -> int:
        return max(len(item["chosen"]), len(item["rejected"]))

    def collate(self, items: Sequence[Item]) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and labels (2B, T): chosen rows, then rejected rows; labels hold the
        next token where it is scored, else IGNORE; `reference` (2B,) the reference's log-probabilities."""
        rows = [(it["chosen"], it["chosen_targets"]) for it in items]
        rows += [(it["rejected"], it["rejected_targets"]) for it in items]
        width = padded_width(max(len(ids) for ids, _ in rows), self.max_length)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (tokens, targets) in enumerate(rows):
            x = torch.tensor(tokens)
            scored = torch.tensor(targets, dtype=torch.bool)
            ids[row, : len(x)] = x
            mask[row, : len(x)] = 1
            labels[row, : len(x) - 1] = torch.where(scored[1:], x[1:], IGNORE)  # position t predicts t + 1
        refs = [it.get("reference", (0.0, 0.0)) for it in items]
        reference = torch.tensor([r[0] for r in refs] + [r[1] for r in refs], dtype=torch.float32)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "reference": reference}

    @staticmethod
    def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    @staticmethod
    def sequence_logps(
        output: LMOutput, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Summed log-probabilities of the scored tokens of each chosen and rejected row (B,), and the
        number of scored tokens of every row (2B,)."""
        scored = batch["labels"] != IGNORE  # (2B, T)
        rows = scored.nonzero()[:, 0]
        logps = token_logprobs(output.hidden[scored], output.weight, batch["labels"][scored], output.chunk)
        sums = sequence_sums(logps, rows, scored.shape[0])
        chosen, rejected = sums.chunk(2)
        return chosen, rejected, scored.sum(1)

    def pair_loss(
        self, output: LMOutput, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The loss, the implicit rewards of both sides, and the policy's log-probabilities of both."""
        chosen, rejected, tokens = self.sequence_logps(output, batch)
        ref_chosen, ref_rejected = batch["reference"].chunk(2)
        tokens_chosen, tokens_rejected = tokens.float().chunk(2)
        c = self.cfg
        loss, reward_chosen, reward_rejected = dpo_loss(
            chosen,
            rejected,
            ref_chosen,
            ref_rejected,
            c.beta,
            c.loss_type,
            c.label_smoothing,
            tokens_chosen,
            tokens_rejected,
            c.gamma,
        )
        return loss, reward_chosen, reward_rejected, chosen.detach(), rejected.detach()

    def loss(self, output: LMOutput, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.needs_reference:
            assert "reference" in batch, "DPO items need the reference's log-probabilities (add_reference)"
        return self.pair_loss(output, batch)[0]

    def new_metrics(self) -> DpoMetrics:
        return DpoMetrics(self)  # (a causal LM's frozen blocks are not cached: see CausalLM.can_split)


class DpoMetrics(PreferenceMetrics):
    """Preference accuracy and margin of the implicit rewards, their means, the loss, and the
    policy's mean log-probabilities of chosen and rejected responses."""

    def __init__(self, objective: DpoObjective) -> None:
        super().__init__()
        self.objective = objective
        self.logps = {"chosen": 0.0, "rejected": 0.0}

    def update_batch(self, output: LMOutput, batch: dict[str, torch.Tensor]) -> None:
        loss, reward_chosen, reward_rejected, chosen, rejected = self.objective.pair_loss(output, batch)
        self.add(reward_chosen.float().cpu(), reward_rejected.float().cpu(), float(loss) * len(chosen))
        self.logps["chosen"] += float(chosen.sum())
        self.logps["rejected"] += float(rejected.sum())

    def compute(self) -> dict[str, Any]:
        out = super().compute()
        n = max(self.count, 1)
        out.update(logps_chosen=self.logps["chosen"] / n, logps_rejected=self.logps["rejected"] / n)
        return out


def _key(item: Item) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return tuple(item["chosen"]), tuple(item["rejected"])
