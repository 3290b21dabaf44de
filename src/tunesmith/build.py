"""A run's model, assembled from its plug-ins: the task builds the base model (with the head it needs,
if any), the method changes it. Everything after this (the loop, evaluation, checkpoints) talks to
the task, its objective and the method through their protocols (tunesmith.plugins).
"""

from __future__ import annotations

from torch import nn

from tunesmith.config import RunConfig
from tunesmith.errors import ConfigError
from tunesmith.models.causal_lm import base_decoder
from tunesmith.plugins import Method, Task

__all__ = [
    "apply_method",
    "build_model",
    "checkpointing_unavailable",
    "enable_checkpointing",
    "refuse_noop",
    "trained_buffers",
]


def build_model(cfg: RunConfig, task: Task, method: Method, num_labels: int) -> tuple[nn.Module, list[str]]:
    """The task's base model with the method applied, and the names of what trains (parameters, and
    buffers that training changes).

    Raises:
        ConfigError: the method does not fit the task or the model.
    """
    task.check_method(method)
    model = task.build_model(num_labels)
    return model, apply_method(cfg, method, model)


def apply_method(cfg: RunConfig, method: Method, model: nn.Module) -> list[str]:
    """Apply the method to a task's base model, in place, as `build_model` does once the task built
    it; the names of what trains (parameters, and buffers that training changes).

    Raises:
        ConfigError: the method does not fit the model.
    """
    _check_positions(cfg, model, method)
    method.apply(model)
    if cfg.train.gradient_checkpointing is True:  # "auto" is decided once the data is known (preflight)
        enable_checkpointing(model, method)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    return names + trained_buffers(model)


def trained_buffers(model: nn.Module) -> list[str]:
    """Buffers that training changes and a run must save with its weights: the running statistics
    of batch norms whose weights train (frozen ones stay in eval mode and keep theirs)."""
    names = []
    for prefix, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
            p.requires_grad for p in module.parameters(recurse=False)
        ):
            names += [f"{prefix}.{name}" if prefix else name for name, _ in module.named_buffers(recurse=False)]
    return names


def refuse_noop(method: Method, model: nn.Module) -> None:
    """Raise when the method's added weights never moved off their identity init."""
    reason = method.noop_reason(model)
    if reason:
        raise ConfigError(f"method.name={method.name}: {reason}; check train.lr, train.epochs and the data")


def _check_positions(cfg: RunConfig, model: nn.Module, method: Method) -> None:
    backbone = getattr(model, "backbone", model)
    limit = getattr(getattr(backbone, "config", None), "max_position_embeddings", None)
    needed = cfg.data.max_length + method.extra_positions
    if limit is not None and needed > limit:
        raise ConfigError(
            f"data.max_length={cfg.data.max_length} + {method.extra_positions} virtual tokens of method.name="
            f"{method.name} is {needed} positions, but the model has {limit}; lower data.max_length"
        )


def checkpointing_unavailable(model: nn.Module, method: Method) -> str | None:
    """Why gradient checkpointing cannot be turned on for `model` under `method`, or None."""
    if method.checkpointing_refusal:
        return f"method.name={method.name}: {method.checkpointing_refusal}"
    backbone = getattr(model, "backbone", None)
    decoder = base_decoder(backbone) if backbone is not None else None
    if not callable(getattr(decoder, "gradient_checkpointing_enable", None)) or not getattr(
        decoder, "supports_gradient_checkpointing", False
    ):
        return f"{type(decoder if decoder is not None else model).__name__} does not support it"
    return None


def enable_checkpointing(model: nn.Module, method: Method) -> None:
    """Recompute each block's activations in its backward pass.

    Raises:
        ConfigError: the model or the method does not allow it.
    """
    reason = checkpointing_unavailable(model, method)
    if reason is not None and method.checkpointing_refusal:
        raise ConfigError(f"train.gradient_checkpointing with {reason}; turn one of them off")
    if reason is not None:
        raise ConfigError(f"train.gradient_checkpointing: {reason}")
    decoder = base_decoder(model.backbone)  # type: ignore[arg-type]
    # Non-reentrant checkpointing works when the inputs need no gradient (frozen embeddings).
    decoder.gradient_checkpointing_enable(  # type: ignore[operator]
        gradient_checkpointing_kwargs={"use_reentrant": False}
    )
