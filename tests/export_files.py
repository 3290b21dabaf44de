"""Checks shared by the export tests: load an export with transformers / peft alone, in a fresh
Python that never imports tunesmith, and compare it with the probe the export wrote beside it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Loads an export with transformers / peft alone and compares it with the probe the export wrote.
CHECK = r"""
import json, sys
from pathlib import Path
import torch, transformers
from safetensors.torch import load_file
out, how = Path(sys.argv[1]), sys.argv[2]
probe = load_file(str(out / "probe.safetensors"))
facts = json.loads((out / "export.json").read_text())
inputs = {k[len("input."):]: v for k, v in probe.items() if k.startswith("input.")}
fmt, kind = how.split("-", 1)
auto = {
    "lm": transformers.AutoModelForCausalLM,
    "text": transformers.AutoModelForSequenceClassification,
    "image": transformers.AutoModelForImageClassification,
    "audio": transformers.AutoModelForAudioClassification,
    "whisper": transformers.WhisperForConditionalGeneration,
}[kind]
path = out
if fmt == "peft":
    path = json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"]
    path = out / path if (out / path).is_dir() else path
model = auto.from_pretrained(path, trust_remote_code=kind in ("text", "image", "audio"))
if fmt == "peft":
    from peft import PeftModel
    model = PeftModel.from_pretrained(model, out)
model.eval()
with torch.no_grad():
    logits = model(**inputs).logits
    if "logits" in probe:
        want = probe["logits"]
    else:  # token logits: the trained model's top values at their token ids
        want = probe["logits_top_values"]
        logits = logits[:, -want.shape[1]:].gather(-1, probe["logits_top_indices"])
    if "mask" in probe:
        keep = probe["mask"].bool()
        logits, want = logits[keep], want[keep]
    generations = []
    for prompt in facts["probe"]["prompts"]:
        ids = torch.tensor([prompt])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=facts["probe"]["max_new_tokens"])[0, len(prompt):].tolist()
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        generations.append([t for t in new[: next((i for i, t in enumerate(new) if t in eos), len(new))]])
print(json.dumps({
    "max_diff": float((logits - want).abs().max()),
    "same_argmax": bool((logits.argmax(-1) == want.argmax(-1)).all()),
    "generations_equal": generations == facts["probe"]["generations"],
    "tunesmith_imported": "tunesmith" in sys.modules,
}))
"""


def load_elsewhere(out: Path, how: str, tmp_path: Path) -> dict:
    """Load `out` in a fresh Python that imports only torch, transformers and peft; what it measured."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    done = subprocess.run(
        [sys.executable, "-c", CHECK, str(out), how], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert not result["tunesmith_imported"]
    return result
