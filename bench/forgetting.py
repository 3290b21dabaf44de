"""Evidence: catastrophic forgetting of SmolLM2-135M-Instruct, and what mitigates it.

Instruction-tunes the packaged SmolLM2 on the packaged review questions (configs/sft-lora.yaml's
data: 640 rows, 1 epoch, trained on the whole row, review included: `data.train_on_prompt`) four
ways and measures, with `eval.retention` on Acts IV-V of the packaged Hamlet (general English the
task never shows), how much more perplexed the model becomes:

- full fine-tuning at lr 2e-4,
- LoRA (r 8, every block linear) at lr 1e-3 (the demo's setting),
- full fine-tuning at lr 2e-4 with 20% of each epoch replayed from Acts I-III of Hamlet (disjoint
  from the retention passages, but the same play: its names and verse lower perplexity on the rest),
- full fine-tuning at a 10x lower lr, 2e-5.

Every run is its own process (tunesmith.compare); the table lands in bench/results/forgetting-*/.
Run: `python bench/forgetting.py [--limit 640]`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tunesmith.compare import Variant, compare

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "sft-lora.yaml"

VARIANTS = [
    Variant("full, lr 2e-4", ("method.name=full", "train.lr=2e-4"), "full, lr 2e-4"),
    Variant("lora, lr 1e-3", ("method.name=lora", "train.lr=1e-3"), "lora r 8, lr 1e-3"),
    Variant(
        "full + replay",
        ("method.name=full", "train.lr=2e-4", "data.replay.path=hamlet-replay", "data.replay.fraction=0.2"),
        "full, lr 2e-4, 20% Hamlet replay",
    ),
    Variant("full, lr 2e-5", ("method.name=full", "train.lr=2e-5"), "full, lr 2e-5"),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=640)
    args = parser.parse_args()
    overrides = [
        f"data.limit={args.limit}",
        "data.train_on_prompt=true",
        "eval.baseline=false",
        "eval.samples=0",
        "eval.exact_match_rows=250",
        "eval.retention.max_rows=64",
    ]
    _, path = compare(CONFIG, VARIANTS, overrides, ROOT / "bench" / "results")
    print(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
