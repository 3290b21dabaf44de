"""The real CLI exports a short LoRA run on the packaged all-MiniLM-L6-v2 to ONNX with int8 weights, and
plain onnxruntime, in a process that imports neither tunesmith nor torch, reproduces the probe the
export wrote beside the model (probe.safetensors) within the tolerance the export states."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_tunesmith, write_jsonl

pytestmark = pytest.mark.slow

_CHECK = """
import json, sys
import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file

directory = sys.argv[1]
probe = load_file(f"{directory}/probe.safetensors")
session = ort.InferenceSession(f"{directory}/model.onnx", providers=["CPUExecutionProvider"])
feed = {i.name: probe[f"input.{i.name}"] for i in session.get_inputs()}
logits = session.run(["logits"], feed)[0]
print(json.dumps({
    "max_abs_diff": float(np.abs(logits - probe["logits"]).max()),
    "same_labels": bool((logits.argmax(-1) == probe["logits"].argmax(-1)).all()),
    "leaked": sorted(m for m in sys.modules if m.split(".")[0] in ("tunesmith", "torch")),
}))
"""


# Reviews a short run already labels with a wide margin, so every probe label is one the int8 graph must
# keep (the parity check leaves near-ties out: one of the run's validation rows scores 50.8% / 49.2%);
# the metric change is measured on the validation split.
CLEAR = [
    ("A delight from start to finish, warm, funny and moving.", "positive"),
    ("Dull, tedious and far too long.", "negative"),
    ("One of the best films of the year: smart, touching and beautifully acted.", "positive"),
    ("A lifeless, boring mess with a script that makes no sense.", "negative"),
    ("Charming and clever, a joy to watch.", "positive"),
    ("Painfully unfunny and utterly forgettable.", "negative"),
    ("A gripping, brilliant thriller with terrific performances.", "positive"),
    ("Stupid, ugly and a complete waste of time.", "negative"),
]


def test_a_minilm_lora_run_exports_to_int8_onnx_that_plain_onnxruntime_runs(tmp_path: Path) -> None:
    quick = [
        "data.limit=64",
        "data.validation=0.005",  # 64 held-out rows measure the int8 metric change
        "data.max_length=32",
        "train.max_steps=16",
        "train.batch_size=16",
        "train.lr=5e-3",
        "train.eval_every=1000",
        "train.precision=fp32",  # eval.json then holds the fp32 model's scores
        "eval.baseline=false",
        f"output.dir={tmp_path / 'runs'}",
    ]
    done = run_tunesmith("train", "configs/classify-lora.yaml", *quick)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    probe_rows = write_jsonl(tmp_path / "clear.jsonl", [{"text": t, "label": label} for t, label in CLEAR])
    out = tmp_path / "onnx-int8"
    done = run_tunesmith("export", run_dir, "--format", "onnx", "--quantize", "int8", "-o", out, "--data", probe_rows)
    assert done.returncode == 0, done.stderr
    facts = json.loads((out / "export.json").read_text())["export"]
    assert facts["quantize"] == "int8" and facts["parity"]["same_argmax"] == 1.0
    # 10.6M of MiniLM's 22.7M weights are MatMuls (int8 now); the token embeddings stay fp32.
    assert facts["model_bytes"] < 0.7 * facts["fp32_model_bytes"]
    assert facts["fp32_max_abs_logit_diff"] < 1e-3
    evaluated = json.loads((run_dir / "eval.json").read_text())["validation"]
    assert facts["held_out_fp32"]["count"] == facts["held_out_int8"]["count"] == evaluated["count"] > 40
    assert facts["held_out_fp32"]["accuracy"] == evaluated["accuracy"]  # the fp32 graph scores as trained
    assert abs(facts["held_out_change"]["accuracy"]) <= 0.1 and facts["held_out_same_label"] >= 0.9
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()

    check = subprocess.run([sys.executable, "-c", _CHECK, str(out)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    seen = json.loads(check.stdout)
    assert seen["leaked"] == [] and seen["same_labels"]
    assert seen["max_abs_diff"] <= facts["parity"]["tolerance"]
