"""Soft prompts: trainable virtual-token embeddings prepended to the input (prompt tuning, Lester
et al. 2021) or per-layer key/value prefixes (prefix tuning, Li & Liang 2021), through peft."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunesmith.config import MethodSection
from tunesmith.errors import ConfigError
from tunesmith.methods import BaseMethod
from tunesmith.models.classifier import TextClassifier
from tunesmith.registry import register_method


class PromptTuningConfig(MethodSection):
    """Learned soft-prompt vectors prepended to the input (Lester et al. 2021), through peft."""

    name: Literal["prompt-tuning"] = "prompt-tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Length of the soft prompt.")
    init_text: str | None = Field(None, description="Initialise the prompt from this text's embeddings.")


class PrefixTuningConfig(MethodSection):
    """Learned per-layer key/value prefixes (Li & Liang 2021), through peft."""

    name: Literal["prefix-tuning"] = "prefix-tuning"
    num_virtual_tokens: int = Field(20, gt=0, description="Length of the prefix at every layer.")
    projection: bool = Field(False, description="Reparameterise prefixes through an MLP while training.")


def _wrap(model: TextClassifier, peft_cfg, method: str) -> None:
    import peft

    try:
        model.backbone = peft.get_peft_model(model.backbone, peft_cfg)
    except (ValueError, AttributeError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"method.name={method}: peft cannot wrap {type(model.backbone).__name__} ({exc}); "
            "choose lora, adapter or ia3 for this model"
        ) from None
    for param in model.head.parameters():
        param.requires_grad_(True)


class _VirtualTokens(BaseMethod):
    """What prompt and prefix tuning share: virtual tokens that no base weight can hold."""

    def merge(self, model: TextClassifier) -> None:
        raise ConfigError(
            f"method.name={self.name}: its virtual tokens cannot be merged into the base weights; "
            "export the run with --format peft"
        )


@register_method("prompt-tuning")
class PromptTuningMethod(_VirtualTokens):
    """Train a few virtual-token embeddings prepended to every input; the model is untouched."""

    name = "prompt-tuning"
    config = PromptTuningConfig
    default_lr = 3e-2
    virtual_tokens = True
    peft_adapter = True

    def __init__(self, cfg: PromptTuningConfig) -> None:
        super().__init__(cfg)
        self.cfg: PromptTuningConfig = cfg
        self.extra_positions = cfg.num_virtual_tokens

    def apply(self, model: TextClassifier) -> None:
        import peft

        text_init: dict[str, Any] = {}
        if self.cfg.init_text:
            text_init = {
                "prompt_tuning_init": peft.PromptTuningInit.TEXT,
                "prompt_tuning_init_text": self.cfg.init_text,
                "tokenizer_name_or_path": getattr(model.backbone, "name_or_path", None),
            }
        peft_cfg = peft.PromptTuningConfig(
            task_type="FEATURE_EXTRACTION", num_virtual_tokens=self.cfg.num_virtual_tokens, **text_init
        )
        _wrap(model, peft_cfg, self.name)


@register_method("prefix-tuning")
class PrefixTuningMethod(_VirtualTokens):
    """Train key/value prefixes at every layer; the model is untouched."""

    name = "prefix-tuning"
    config = PrefixTuningConfig
    default_lr = 1e-2
    virtual_tokens = True
    peft_adapter = True
    checkpointing_refusal = "the prefix is a cache that checkpointing cannot recompute"

    def __init__(self, cfg: PrefixTuningConfig) -> None:
        super().__init__(cfg)
        self.cfg: PrefixTuningConfig = cfg

    def apply(self, model: TextClassifier) -> None:
        import peft

        peft_cfg = peft.PrefixTuningConfig(
            task_type="FEATURE_EXTRACTION",
            num_virtual_tokens=self.cfg.num_virtual_tokens,
            prefix_projection=self.cfg.projection,
        )
        _wrap(model, peft_cfg, self.name)
