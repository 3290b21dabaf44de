"""ONNX export (DESIGN §10): the trained model, its method merged in, traced by `torch.export` into one
ONNX graph (`torch.onnx.export(dynamo=True)`) that onnxruntime runs without torch or tunesmith;
`--quantize int8` then quantizes its MatMul weights with onnxruntime's dynamic quantization.

The graph takes the tensors the trained model takes, under the names the run gives them (`input_ids`,
`attention_mask`, `pixel_values`, `input_features`, ...), with the batch axis dynamic and so the token
axis of ids and masks, and returns fp32 `logits`: class logits (batch, labels) for a classifier or a
reward model, next-token logits (batch, sequence, vocabulary) for a causal LM, without a KV cache (greedy
decoding reruns the sequence, as the parity check here does), and for a speech-to-text model the
teacher-forced decoder logits (the audio and the decoder's ids so far in, the next token's logits out:
decoding needs the caller's own loop over the decoder ids). Tokenizer and feature extractor files go
beside `model.onnx`, the label names into its metadata (`labels`), so the directory is self-contained.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tunesmith.errors import ConfigError, TunesmithError
from tunesmith.exports import Exported
from tunesmith.exports.parity import Parity, Probe, compare, held_out_rows, median_seconds, model_logits
from tunesmith.inference import Trained

__all__ = ["FP32_TOLERANCE", "INT8_TOLERANCE", "check", "export"]

MODEL_FILE = "model.onnx"
# Tolerances, relative to the probe's largest |logit| (at least 1). fp32: onnxruntime computes the same
# fp32 arithmetic in another order (fused attention, LayerNorm and GELU kernels, other matmul blocking);
# measured: 1-3e-7 on tiny BERT and Llama models, 2e-7 to 1e-6 on MiniLM-L6 (logits about 1-2). 1e-3
# leaves room for deeper and wider models and still fails a wrong weight, a missed merge or a dropped
# mask, which move logits by 1e-2 and more.
FP32_TOLERANCE = 1e-3
# int8: every MatMul weight rounded to 1/255 of its channel's range, every activation to 8 bits at run
# time; measured: 0.005-0.01 on tiny BERT and Llama models, 0.06-0.115 of the logit scale on MiniLM-L6
# (the same short LoRA run, differing only in which dropout kernel, hence which random masks, trained
# it). Beside the bound, every probe label the trained model decides by more than twice it must stay
# the same (and every greedy generation, for a causal LM), and the held-out metric change is reported.
INT8_TOLERANCE = 0.15
METRIC_ROWS = 1000  # at most this many held-out rows measure a quantized model's metric change
_TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
_NEEDS = ("onnx", "onnxscript", "onnxruntime")


def check(trained: Trained, quantize: str | None) -> None:
    """Refuse, in one line and before any work, a run that cannot become one ONNX graph.

    Raises:
        ConfigError: the method learns virtual tokens (prompt and prefix tuning), or a package is missing.
    """
    method = trained.method
    if method.virtual_tokens:
        raise ConfigError(
            f"--format onnx: method.name={method.name} learns virtual tokens that cannot be merged into the "
            "model's weights; export the run with --format peft"
        )
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}: pip install {' '.join(missing)}")


def export(trained: Trained, probe: Probe, out: Path, quantize: str | None) -> Exported:
    """Write `model.onnx` (and the tokenizer or feature extractor files) into `out`, load it back with
    onnxruntime and measure it against the probe: parity, load time, latency per row, and for int8 the
    held-out metric change against the fp32 graph.

    Raises:
        ConfigError: the method cannot be merged, or torch.onnx cannot export the model.
    """
    model = _merged(trained)
    path = out / MODEL_FILE
    fp32 = path if quantize is None else out / ".fp32" / MODEL_FILE  # the graph int8 starts from
    fp32.parent.mkdir(exist_ok=True)
    _write_graph(model, probe, fp32, trained)
    if quantize is not None:
        _quantize_int8(fp32, path)
    started = time.perf_counter()
    session = _session(path)
    load_seconds = time.perf_counter() - started
    parity = _parity(session, probe, FP32_TOLERANCE if quantize is None else INT8_TOLERANCE, quantize)
    feed = _feed(probe.inputs)
    latency = median_seconds(lambda: session.run(["logits"], feed)) / probe.rows
    details: dict[str, Any] = {"model_bytes": _bytes(path)}
    if quantize is not None:
        details |= _against_fp32(trained, probe, fp32, session)
        shutil.rmtree(fp32.parent)
    if trained.objective.tokenizer is not None:
        trained.objective.tokenizer.save_pretrained(out)
    return Exported(
        format="onnx",
        path=out,
        parity=parity,
        load_seconds=load_seconds,
        latency_ms=latency * 1000,
        load_hint=_load_hint(session, trained),
        quantize=quantize,
        details=details,
    )


def _parity(session: Any, probe: Probe, tolerance: float, quantize: str | None) -> Parity:
    """The graph's logits (and greedy generations) on the probe against the trained model's; the
    tolerance scales with the probe's largest |logit|."""
    logits = torch.from_numpy(session.run(["logits"], _feed(probe.inputs))[0])
    generations = _greedy(session, probe) if probe.prompts else None
    scale = max(1.0, float(probe.logits.abs().max()))
    kind = "fp32" if quantize is None else "with int8 MatMul weights"
    note = f"onnxruntime {kind}; tolerance {tolerance:g} x the largest |logit| ({scale:.3g})"
    return compare(probe, logits, tolerance * scale, generations, note)


class _Logits(nn.Module):
    """The trained model as the graph runs it: its input tensors in order in, fp32 logits out."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return model_logits(self.model, dict(zip(self.names, tensors, strict=True)))


def _merged(trained: Trained) -> nn.Module:
    """The trained model with what its method added folded into its weights (in place), fp32, eval."""
    trained.method.merge(trained.model)  # raises ConfigError for what cannot merge
    return trained.model.float().eval()


def _axes(inputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    """Dynamic axes of each input: the batch always; the token axis of ids and masks, where they go
    with token ids (decoder inputs have a token axis of their own). Feature axes (pixels, mel frames,
    samples) stay fixed: the model was built for their size."""
    axes: dict[str, dict[int, str]] = {}
    for name, tensor in inputs.items():
        prefix = "decoder_" if name.startswith("decoder_") else ""
        spec = {0: "batch"}
        if tensor.ndim == 2 and name.removeprefix(prefix) in _TOKEN_INPUTS and f"{prefix}input_ids" in inputs:
            spec[1] = f"{prefix}sequence"
        axes[name] = spec
    return axes


def _write_graph(model: nn.Module, probe: Probe, path: Path, trained: Trained) -> None:
    """Trace `model` on the probe's inputs and save the graph (weights inline; in `<path>.data` past 2 GB)."""
    names = list(probe.inputs)
    # torch.export specialises an axis whose example size is 1: trace on at least two rows.
    example = tuple(t if t.shape[0] > 1 else torch.cat([t, t]) for t in probe.inputs.values())
    axes = _axes(probe.inputs)
    try:
        with torch.no_grad(), _quiet_exporter():
            program = torch.onnx.export(
                _Logits(model, names).eval(),
                example,
                input_names=names,
                output_names=["logits"],
                dynamic_shapes={"tensors": tuple(axes[n] for n in names)},
                dynamo=True,
                verbose=False,
            )
    except torch.onnx.errors.OnnxExporterError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"{trained.where}: torch.onnx cannot export the {type(model).__name__} ({reason}); "
            "export the run with --format hf instead"
        ) from exc
    assert program is not None  # dynamo=True always returns the program
    meta = program.model.metadata_props
    meta["labels"] = json.dumps(list(trained.objective.labels))
    meta["task"] = trained.config.task
    meta["inputs"] = json.dumps({n: axes[n] for n in names})
    program.save(str(path))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx without the notes that do not concern a user: that torchvision's detection ops are
    not registered, and that axes sharing a name (every input's `batch`) are one axis."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="# The axis name: .* will not be used", category=UserWarning)
            yield
    finally:
        registration.setLevel(level)


def _quantize_int8(source: Path, target: Path) -> None:
    """onnxruntime's dynamic quantization: MatMul weights to int8 (per output channel, which kept MiniLM's
    logits 2-3x closer to fp32 than one scale per tensor), activations to uint8 at run time. Convolutions
    stay fp32: dynamic quantization suits the MatMuls of transformers, while onnxruntime recommends static
    quantization, with calibration data, for conv nets."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _without_preprocessing_advice():
        quantize_dynamic(
            source,
            target,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            weight_type=QuantType.QInt8,
            use_external_data_format=_bytes(source) > 2**31 - 2**26,
        )


@contextlib.contextmanager
def _without_preprocessing_advice() -> Iterator[None]:
    """quantize_dynamic without its advice to run onnxruntime's pre-processing first, which fails on
    graphs with a dynamic sequence axis ("Incomplete symbolic shape inference"). The advice is logged on
    the root logger; a NullHandler keeps that call from configuring logging for the whole process."""
    root = logging.getLogger()
    handler = logging.NullHandler()

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Please consider to run pre-processing")

    root.addHandler(handler)
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)
        root.removeHandler(handler)


def _against_fp32(trained: Trained, probe: Probe, fp32: Path, int8: Any) -> dict[str, Any]:
    """What quantization changed against the fp32 graph: size, latency per row, parity, and the task's
    held-out metrics."""
    session = _session(fp32)
    feed = _feed(probe.inputs)
    latency = median_seconds(lambda: session.run(["logits"], feed)) / probe.rows
    return {
        "fp32_model_bytes": _bytes(fp32),
        "fp32_latency_ms_per_row": round(latency * 1000, 3),
        "fp32_max_abs_logit_diff": _parity(session, probe, FP32_TOLERANCE, None).max_abs_diff,
        **_metric_change(trained, probe, {"fp32": session, "int8": int8}),
    }


def _metric_change(trained: Trained, probe: Probe, sessions: dict[str, Any]) -> dict[str, Any]:
    """The task's own metrics on up to METRIC_ROWS held-out rows through each graph, int8 - fp32, and
    the share of rows whose label int8 keeps (classifiers).

    A causal LM's metrics read hidden states the graph does not give; its quantization is judged by the
    probe alone (every next-token argmax and greedy generation the same)."""
    if trained.task.output == "text":
        return {"held_out": "the probe's token argmax and greedy generations (parity) judge a causal LM"}
    try:
        source, examples = _metric_rows(trained, probe)
    except TunesmithError as exc:
        return {"held_out": f"not measured: {exc}"}
    objective, cfg = trained.objective, trained.config
    from tunesmith.runtime import make_runtime

    runtime = make_runtime(cfg.train.model_copy(update={"precision": "fp32"}), cfg.eval, trained.model)
    items = trained.task.prepare_eval(trained, objective.encode(examples, "eval"), runtime)
    metrics = {name: objective.new_metrics() for name in sessions}
    kept, rows = 0, 0
    for start in range(0, len(items), 32):
        batch = objective.collate(items[start : start + 32])
        feed = _feed(objective.model_inputs(batch))
        logits = {name: session.run(["logits"], feed)[0] for name, session in sessions.items()}
        for name, value in logits.items():
            metrics[name].update_batch(torch.from_numpy(value), batch)
        if logits["fp32"].ndim == 2:  # (B, C): one label a row
            kept += int((logits["fp32"].argmax(-1) == logits["int8"].argmax(-1)).sum())
            rows += len(logits["fp32"])
    scores = {name: _scalars(m.compute()) for name, m in metrics.items()}
    change = {k: round(scores["int8"][k] - v, 6) for k, v in scores["fp32"].items() if isinstance(v, float)}
    return {
        "held_out": f"{len(examples)} rows of {source}",
        "held_out_fp32": scores["fp32"],
        "held_out_int8": scores["int8"],
        "held_out_change": change,
        **({"held_out_same_label": round(kept / rows, 6)} if rows else {}),
    }


def _metric_rows(trained: Trained, probe: Probe) -> tuple[str, list[Any]]:
    """Up to METRIC_ROWS rows to measure with: the run's held-out rows, else the probe's data file."""
    try:
        source, examples = held_out_rows(trained)
    except ConfigError:
        if not Path(probe.source).exists():
            raise
        source, examples = held_out_rows(trained, probe.source)
    return source, examples[:METRIC_ROWS]


def _scalars(metrics: dict[str, Any]) -> dict[str, float | int]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _greedy(session: Any, probe: Probe) -> list[list[int]]:
    """Each probe prompt's greedy continuation through the graph (the whole sequence rerun per token)."""
    out = []
    for prompt in probe.prompts:
        ids: list[int] = list(prompt)
        new: list[int] = []
        for _ in range(probe.max_new_tokens):
            feed = {"input_ids": np.array([ids], dtype=np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
            token = int(session.run(["logits"], feed)[0][0, -1].argmax())
            if token in probe.eos:
                break
            ids.append(token)
            new.append(token)
        out.append(new)
    return out


def _session(path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _feed(inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: tensor.detach().cpu().numpy() for name, tensor in inputs.items()}


def _bytes(path: Path) -> int:
    """A graph's size, with its external weights file where it has one."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _load_hint(session: Any, trained: Trained) -> str:
    """The lines of plain onnxruntime Python that run the export (from inside its directory)."""
    graph_inputs = session.get_inputs()
    names = [i.name for i in graph_inputs]
    (output,) = session.get_outputs()
    lines = [
        "import json",
        "import onnxruntime as ort",
        f'session = ort.InferenceSession("{MODEL_FILE}", providers=["CPUExecutionProvider"])',
    ]
    if trained.objective.tokenizer is not None and set(names) <= set(_TOKEN_INPUTS):
        lines += [
            "from transformers import AutoTokenizer  # or the tokenizers package, on tokenizer.json",
            'tokens = AutoTokenizer.from_pretrained(".")(["your text"], padding=True, return_tensors="np")',
            f"feed = {{name: tokens[name] for name in {names}}}",
        ]
    else:
        shapes = "; ".join(f"{i.name} {i.type.removeprefix('tensor(').rstrip(')')} {i.shape}" for i in graph_inputs)
        lines.append(f"# feed: a numpy array for each input: {shapes}")
        if trained.objective.tokenizer is not None:
            lines.append("# (the tokenizer / feature extractor files beside model.onnx make them with transformers)")
    lines.append(f'logits = session.run(["logits"], feed)[0]  # float32 {output.shape}')
    if trained.objective.labels:
        lines.append('labels = json.loads(session.get_modelmeta().custom_metadata_map["labels"])')
    return "\n".join(lines)
