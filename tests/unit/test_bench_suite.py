"""`make bench` writes one README section per machine kind and keeps the others."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import suite  # noqa: E402  (bench/suite.py, run as a script elsewhere)

XEON = {"cpu": "Intel(R) Xeon(R) Processor", "bf16": False, "cores": 2}
EPYC = {"cpu": "AMD EPYC 9B14", "bf16": True, "cores": 2}
PEAK = {"fp32": 281.0, "bf16": 61.0}


def test_the_last_table_of_a_scripts_output_is_kept() -> None:
    out = "warm-up\n| a | b |\n|---|---|\n| 1 | 2 |\n\nmedians\n| x |\n|---|\n| 3 |\nWritten to f.json\n"
    assert suite.last_table(out) == "| x |\n|---|\n| 3 |"
    assert suite.last_table("no table") == ""


def test_each_machine_kind_gets_its_own_section_and_a_rerun_replaces_only_its_own() -> None:
    readme = "# tunesmith\n\n## Benchmarks\n\ntext\n\n## Config reference\n\nkeys\n"
    assert suite.machine_kind(XEON) == "intel-r-xeon-r-processor-no-bf16"
    xeon = suite.machine_section(XEON, PEAK, {"sft": "| t |\n|---|\n| 1 |"}, "2026-11-30")
    once = suite.write_section(readme, suite.machine_kind(XEON), xeon)
    assert once.endswith("## Measured on each machine\n\n" + xeon + "\n")
    assert "281 GFLOP/s fp32" in xeon and "BF16 no" in xeon and "`bench/sft.py`" in xeon

    epyc = suite.machine_section(EPYC, PEAK, {"rl_sampling": ""}, "2026-11-30")
    both = suite.write_section(once, suite.machine_kind(EPYC), epyc)
    assert both.index(xeon) < both.index(epyc) and "(no table: the run failed)" in epyc

    newer = suite.machine_section(XEON, PEAK, {"sft": "| t |\n|---|\n| 2 |"}, "2026-12-01")
    again = suite.write_section(both, suite.machine_kind(XEON), newer)
    assert newer in again and xeon not in again and epyc in again
    assert again.startswith(readme.split("## Measured")[0].rstrip("\n"))

    # a section placed before another top-level section keeps that section after it
    middle = readme.replace("## Config reference", "## Measured on each machine\n\n## Config reference")
    placed = suite.write_section(middle, suite.machine_kind(XEON), xeon)
    assert placed.index(xeon) < placed.index("## Config reference")


def test_a_xeon_with_amx_is_a_kind_of_its_own() -> None:
    amx = {**XEON, "bf16": True, "amx": True}  # same model name, a bf16 matmul 7x the fp32 one
    assert suite.machine_kind(amx) == "intel-r-xeon-r-processor-amx"
    assert suite.machine_kind({**XEON, "bf16": True, "amx": False}) == "intel-r-xeon-r-processor-bf16"
    assert "BF16 yes (AMX)" in suite.machine_section(amx, PEAK, {}, "2026-12-02")


def test_runs_over_several_seeds_report_each_tools_accuracy_range() -> None:
    import harness

    workload = harness.Workload("lora", 1, 5e-4, "LoRA")
    runs = [
        {"workload": "lora", "tool": tool, "precision": "fp32", "train_seconds": 10.0, "samples_per_second": rate}
        | {"peak_rss_mb": 100.0, "accuracy": accuracy, "seed": seed}
        for tool, rate, accuracy, seed in [
            ("tunesmith", 30.0, 0.80, 42),
            ("tunesmith", 32.0, 0.78, 43),
            ("reference-fp32", 10.0, 0.79, 42),
            ("reference-fp32", 11.0, 0.77, 43),
        ]
    ]
    metrics = ("samples_per_second", "peak_rss_mb", "accuracy")
    summary = harness.summarize(runs, {"lora": workload}, metrics, lambda w, t: 1e9, {"fp32": 100.0}, metrics[0])
    assert summary["lora"]["medians"]["tunesmith"]["accuracy_range"] == [0.78, 0.80]
    table = harness.markdown(summary, runs, [], {"lora": workload}, ["| tool |"], lambda label, m: f"| {label} |")
    assert "Accuracy over seeds 42, 43 (lowest–highest): reference-fp32 0.770–0.790; tunesmith 0.780–0.800." in table
