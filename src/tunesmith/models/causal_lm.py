"""A causal language model split into its decoder (`backbone`) and its output layer.

The split mirrors the text classifier's, so every method applies to a causal LM unchanged: methods
wrap or freeze `backbone`; `head` is empty (a causal LM gets no new head); the output layer stays
outside the backbone, where the chunked loss (losses/lm.py) reads its weight and projects
only the positions that are trained. `forward` therefore returns hidden states, never logits.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

__all__ = ["CausalLM", "LMOutput"]


class LMOutput(NamedTuple):
    hidden: torch.Tensor  # (B, T, H) final (normed) hidden states of the real positions
    weight: torch.Tensor  # (V, H) the output layer, to be applied where a loss or a logit is needed
    chunk: int | None = None  # tokens per chunk of logits in the losses (None: their default; measured in training)


class CausalLM(nn.Module):
    pretrained_lr_scale = 1.0  # a transformer: the methods' default rates are for it (plugins.TaskModel)

    def __init__(self, backbone: nn.Module, lm_head: nn.Linear, eos_ids: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.backbone = backbone
        self.lm_head = lm_head
        self.eos_ids = eos_ids  # end-of-sequence ids from the model's generation config
        self.head = nn.ModuleDict()  # no new head: what `head` trains for a classifier is nothing here
        self.attention_request = "sdpa"  # model.attention as configured; auto is measured in training
        self.loss_chunk: int | None = None  # the losses' chunk of logits, measured in training (training/kernels.py)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> LMOutput:
        """Hidden states for token ids (B, T). `attention_mask` is (B, T) for padded rows, or an
        additive (B, 1, T, T) block-diagonal causal mask with `position_ids` (B, T) for packed rows."""
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if position_ids is not None:
            kwargs["position_ids"] = position_ids
        hidden = self.backbone(**kwargs).last_hidden_state  # (B, T', H)
        # Prompt tuning puts its virtual tokens in front: keep the real positions only.
        return LMOutput(hidden[:, -input_ids.shape[1] :], self.lm_head.weight, self.loss_chunk)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(…, H) -> (…, V) in fp32; for the few positions generation needs."""
        return self.lm_head(hidden.to(self.lm_head.weight.dtype)).float()  # type: ignore[no-any-return]

    @staticmethod
    def can_split(k: int) -> bool:
        """Caching the token states of frozen blocks is implemented for encoders only."""
        return False


def base_decoder(backbone: nn.Module) -> nn.Module:
    """The Hugging Face decoder inside a backbone that peft may have wrapped."""
    get_base = getattr(backbone, "get_base_model", None)
    return get_base() if callable(get_base) else backbone
