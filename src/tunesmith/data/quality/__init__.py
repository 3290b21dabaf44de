"""The data quality gate (DESIGN §6): the generic engine every task's checks run on.

- report.py: findings against `data.thresholds`, the report, and the gate before training;
- scan.py, findings.py, check.py: the streamed pass over rows (duplicates by hash and MinHash,
  leakage, lengths), which a task joins with its `RowChecks`; `data clean` on top of it;
- pairs.py: the checks of preference pairs; render.py: the report as a table and as HTML.

Tasks add their own checks (tunesmith/tasks/): which rows are empty or malformed for them, how long
a row is once encoded, and which findings their report lists.
"""

from tunesmith.data.quality.check import check_file, check_rows, clean_file, dropped_path, stream_rows
from tunesmith.data.quality.report import CleanSummary, Finding, QualityReport, gate, limited
from tunesmith.data.quality.rows import Measure, RowFacts, normalize, row_problem
from tunesmith.data.quality.scan import RowChecks, Scan

__all__ = [
    "CleanSummary",
    "Finding",
    "Measure",
    "QualityReport",
    "RowChecks",
    "RowFacts",
    "Scan",
    "check_file",
    "check_rows",
    "clean_file",
    "dropped_path",
    "gate",
    "limited",
    "normalize",
    "row_problem",
    "stream_rows",
]
