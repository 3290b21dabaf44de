"""The model card written into every export (README.md), and the files that let anyone re-check parity.

The card states what the model is (base model and its hash, method, task, labels), what it learned
from (data files and their hashes, hyperparameters), how well (held-out metrics before and after,
retention change), and how exactly the artifact matches the trained model (the probe, the tolerance
and the measured difference). Beside it: `export.json` (the same facts as data) and
`probe.safetensors` (the probe's input tensors and the trained model's logits: for a model that
generates, the 32 largest of each position with their token ids), so the parity check can be
repeated with the plain library alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from tunesmith.exports.parity import Probe
from tunesmith.inference import Trained
from tunesmith.runs import atomic_write_text, read_json, write_json

if TYPE_CHECKING:
    from tunesmith.exports import Exported

__all__ = ["TOP_K", "write_card"]

TOP_K = 32  # token logits kept per position in probe.safetensors


def write_card(out: Path, trained: Trained, exported: Exported, probe: Probe) -> None:
    """README.md, export.json and probe.safetensors in the export directory `out`."""
    facts = _facts(trained, exported, probe)
    write_json(out / "export.json", facts)
    tensors = {f"input.{k}": v.clone().contiguous() for k, v in probe.inputs.items() if isinstance(v, torch.Tensor)}
    if probe.logits.ndim == 3:  # token logits: the top 32 of each position (all of them would outweigh a model)
        top = probe.logits.float().topk(min(TOP_K, probe.logits.shape[-1]), dim=-1)
        tensors["logits_top_values"], tensors["logits_top_indices"] = top.values.contiguous(), top.indices.contiguous()
    else:
        tensors["logits"] = probe.logits.float().contiguous()
    if probe.mask is not None:
        tensors["mask"] = probe.mask.clone().contiguous()
    save_file(tensors, str(out / "probe.safetensors"))
    atomic_write_text(out / "README.md", _render(facts, exported))


def _facts(trained: Trained, exported: Exported, probe: Probe) -> dict[str, Any]:
    cfg, run = trained.config, trained.run
    manifest = _optional(run.dir / "manifest.json") if run else {}
    metrics = _optional(run.dir / "eval.json") if run else {}
    train = metrics.get("train", {})
    return {
        "export": exported.to_dict() | {"path": exported.path.name},
        "run": str(run.dir) if run else None,
        "task": cfg.task,
        "summary": trained.task.summary,
        "labels": list(trained.objective.labels),
        "base_model": {"name": cfg.model.name, **manifest.get("base_model", {})},
        "method": cfg.method.model_dump(),
        "data": manifest.get("data", {}),
        "hyperparameters": cfg.train.model_dump(exclude={"early_stopping"}),
        "metrics": {
            "after": {k: _headline(v) for k, v in metrics.items() if k in ("validation", "test")},
            "before": {k: _headline(v) for k, v in metrics.get("baseline", {}).items()},
            "retention": metrics.get("retention"),
        },
        "training": {k: train.get(k) for k in ("steps", "train_seconds", "precision", "trainable_parameters")},
        "probe": {
            "source": probe.source,
            "rows": probe.rows,
            "prompts": probe.prompts,
            "generations": probe.generations,
            "max_new_tokens": probe.max_new_tokens,
        },
    }


def _render(facts: dict[str, Any], exported: Exported) -> str:
    parity, base = exported.parity, facts["base_model"]
    method = facts["method"]
    settings = ", ".join(f"{k}={v}" for k, v in method.items() if k != "name" and v is not None)
    lines = [
        f"# {Path(facts['run'] or base['name']).name} ({exported.format} export)",
        "",
        f"Fine-tuned with tunesmith: **{facts['task']}** ({facts['summary']}) from **{base['name']}** "
        f"with **{method['name']}**{f' ({settings})' if settings else ''}.",
        "",
        "## Load it",
        "",
        "```",
        exported.load_hint.strip(),
        "```",
        "",
        "## Parity with the trained model",
        "",
        f"Checked before this export was written: {parity.describe()}. Probe rows: {facts['probe']['source']}; "
        "their inputs and the trained model's logits are in `probe.safetensors`."
        + (f" {parity.note}" if parity.note else ""),
        "",
        "## Base model",
        "",
        f"- name: {base['name']}",
        f"- path: {base.get('path')}",
        f"- sha256: {base.get('sha256')}",
        "",
        "## Data",
        "",
        *(f"- {name}: sha256 {digest}" for name, digest in facts["data"].items()),
        "",
        "## Metrics",
        "",
        "| split | " + " | ".join(("before", "after")) + " |",
        "|---|---|---|",
        *(
            f"| {split} | {_fmt(facts['metrics']['before'].get(split))} | {_fmt(after)} |"
            for split, after in facts["metrics"]["after"].items()
        ),
    ]
    retention = facts["metrics"].get("retention")
    if retention:
        lines += ["", f"Retention (what the base model knew): {json.dumps(retention, default=str)}"]
    lines += [
        "",
        "## Hyperparameters",
        "",
        *(f"- {k}: {v}" for k, v in facts["hyperparameters"].items() if v is not None),
        "",
        "## Intended use",
        "",
        f"{facts['summary'][:1].upper()}{facts['summary'][1:]}"
        + (f", over the labels {', '.join(facts['labels'])}" if facts["labels"] else "")
        + ". It was tuned and measured only on the data above; check it on your own data before relying on it.",
        "",
    ]
    if exported.details:
        lines += ["## Export details", "", *(f"- {k}: {v}" for k, v in exported.details.items()), ""]
    return "\n".join(lines)


def _headline(metrics: Any) -> dict[str, Any]:
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _fmt(metrics: dict[str, Any] | None) -> str:
    if not metrics:
        return "-"
    return ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if k != "count")


def _optional(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}
