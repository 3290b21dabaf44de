"""Run the benchmark suite on this machine and write its tables into the README, one section per
machine kind.

Each benchmark runs as its own script (`python bench/<name>.py`, its defaults), one after the
other; the last Markdown table each prints is kept. Before them the machine is described (the
CPU's model name as lscpu gives it, whether it has BF16 instructions and AMX, its cores) and its matmul
peak measured (2048² fp32 and bf16, median of 7): the MFU figures of the benchmarks are against
that. The README section between `<!-- bench:KIND:start -->` and `<!-- bench:KIND:end -->`, where
KIND names the CPU model and its BF16 flag (or AMX), is replaced (or added under "Measured on each
machine"); other machines' sections stay as they are, so the README keeps every kind measured.

The whole suite takes hours on a 2-core machine; `--only rl_sampling,preference_memory` runs some.
Run: `make bench` or `python bench/suite.py [--only NAMES] [--readme README.md] [--dry-run]`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from harness import describe_machine, matmul_peak

HERE = Path(__file__).resolve().parent
SUITE = {  # script -> what its table measures
    "classification": "Text classification: MiniLM against the Trainer + peft",
    "sft": "Instruction tuning: LoRA on SmolLM2-135M-Instruct against the Trainer + peft",
    "preference_memory": "DPO memory against SFT",
    "rl_sampling": "RL group sampling against transformers' generate",
    "rl_sampling_lora": "RL group sampling with LoRA r8 on both sides against transformers' generate",
    "rl_sampling_lora_auto": "The same at `precision: auto` (bf16 autocast on both sides where auto picks bf16)",
    "vision": "Image classification: EfficientNet-Lite0 against a plain PyTorch loop",
    "speech": "Keyword spotting: Whisper tiny.en against the Trainer",
    "export": "Export: every format of four packaged models",
    "distributed": "1 against 2 processes",
}
VARIANTS = {  # name -> (script, its arguments)
    "rl_sampling_lora": ("rl_sampling", ["--lora", "8"]),
    "rl_sampling_lora_auto": ("rl_sampling", ["--lora", "8", "--precision", "auto"]),
}
SECTION = "## Measured on each machine"


def machine_kind(machine: dict) -> str:
    """A key for the machine kind: the CPU model and its BF16 flag, or AMX where it has those tiles,
    e.g. `intel-r-xeon-r-processor-bf16` (one model name covers Xeons with and without AMX)."""
    slug = re.sub(r"[^a-z0-9]+", "-", machine["cpu"].lower()).strip("-")
    return f"{slug}-{'amx' if machine.get('amx') else 'bf16' if machine['bf16'] else 'no-bf16'}"


def _bf16(machine: dict) -> str:
    return "yes (AMX)" if machine.get("amx") else "yes" if machine["bf16"] else "no"


def last_table(output: str) -> str:
    """The last Markdown table (consecutive lines starting with `|`) in a script's output."""
    tables, current = [], []
    for line in output.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return "\n".join(tables[-1]) if tables else ""


def machine_section(machine: dict, peak: dict[str, float], tables: dict[str, str], date: str) -> str:
    """The README block for one machine kind."""
    kind = machine_kind(machine)
    lines = [
        f"<!-- bench:{kind}:start -->",
        f"### {machine['cpu']}, {machine['cores']} cores, BF16 {_bf16(machine)}",
        "",
        f"Measured {date} by `bench/suite.py` ({len(tables)} of the {len(SUITE)} benchmarks); matmul peak in "
        f"the same run: {peak['fp32']:.0f} GFLOP/s fp32, {peak['bf16']:.0f} GFLOP/s bf16 (2048², median of 7).",
    ]
    for name, table in tables.items():
        script, extra = VARIANTS.get(name, (name, []))
        run = " ".join([f"bench/{script}.py", *extra])
        lines += ["", f"**{SUITE.get(name, name)}** (`{run}`)", "", table or "(no table: the run failed)"]
    lines.append(f"<!-- bench:{kind}:end -->")
    return "\n".join(lines)


def write_section(readme: str, kind: str, block: str) -> str:
    """`readme` with the block of machine `kind` replaced, or added at the end of the section."""
    start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
    if start in readme and end in readme:
        return readme[: readme.index(start)] + block + readme[readme.index(end) + len(end) :]
    if SECTION not in readme:
        return readme.rstrip("\n") + f"\n\n{SECTION}\n\n{block}\n"
    head, rest = readme.split(SECTION, 1)
    following = re.search(r"^## ", rest, flags=re.MULTILINE)  # the next top-level section
    cut = following.start() if following else len(rest)
    return head + SECTION + rest[:cut].rstrip("\n") + f"\n\n{block}\n\n" + rest[cut:].lstrip("\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SUITE), help="comma-separated benchmark names")
    parser.add_argument("--readme", type=Path, default=HERE.parent / "README.md")
    parser.add_argument("--dry-run", action="store_true", help="print the section instead of writing it")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        print(f"--only: unknown benchmark {', '.join(unknown)}; choose from {', '.join(SUITE)}", file=sys.stderr)
        return 2
    machine, peak = describe_machine(), matmul_peak()
    print(f"{machine['cpu']}, {machine['cores']} cores, BF16 {machine['bf16']}; peak {json.dumps(peak)}", flush=True)
    tables = {}
    for name in names:
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        script, extra = VARIANTS.get(name, (name, []))
        command = [sys.executable, str(HERE / f"{script}.py"), *extra]
        proc = subprocess.run(command, capture_output=True, text=True, check=False)
        tables[name] = last_table(proc.stdout) if proc.returncode == 0 else ""
        print(tables[name] or proc.stderr[-2000:], f"\n({time.perf_counter() - started:.0f} s)", flush=True)
    block = machine_section(machine, peak, tables, time.strftime("%Y-%m-%d"))
    if args.dry_run:
        print(block)
    else:
        args.readme.write_text(write_section(args.readme.read_text(), machine_kind(machine), block))
        print(f"README section {machine_kind(machine)} written")
    return 0 if all(tables.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
