"""The python grader's runner: the grader's `grade(sample, item)` run in a fresh Python process, one
process per scoring call, each call limited in time. A separate process, not a sandbox."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
from typing import Any

__all__ = ["PYTHON_GRADER_STARTUP_S", "PYTHON_GRADER_TIMEOUT_S", "run_python"]

# A python grader runs in its own interpreter. Each call of its code (the source's top level, then
# grade() once per completion) may take PYTHON_GRADER_TIMEOUT_S; a call that runs over gives NaN for
# that completion and the next one goes on. If the process stops answering (the grader blocked the
# alarm, or sits in C code), it is killed after timeout × (completions + 1) + PYTHON_GRADER_STARTUP_S.
PYTHON_GRADER_TIMEOUT_S = 10.0
PYTHON_GRADER_STARTUP_S = 5.0
_ENV_KEPT = ("PATH", "HOME", "TMPDIR", "TEMP", "TMP", "SYSTEMROOT", "LANG", "LC_ALL")


# The program a python grader runs in: it reads {source, cases, timeout_s} on stdin and writes one
# JSON line per case ({"i", "score"} or {"i", "error"}) to its stdout as soon as the case is done, so a
# process killed halfway keeps the scores it gave. What the grader prints goes to stderr.
_RUNNER = r"""
import json, math, numbers, signal, sys, types

class _Timeout(BaseException):
    pass

def _alarm(signum, frame):
    raise _Timeout()

TIMER = hasattr(signal, "setitimer")

def call(function, limit):
    try:
        if TIMER:
            signal.setitimer(signal.ITIMER_REAL, limit)
        try:
            return function(), None
        finally:
            if TIMER:
                signal.setitimer(signal.ITIMER_REAL, 0)
    except _Timeout:
        return None, "timed out after %g s" % limit
    except BaseException as exc:
        return None, "%s: %s" % (type(exc).__name__, exc)

def number(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, "grade returned %s, not a number" % type(value).__name__
    try:
        value = float(value)
    except BaseException as exc:
        return None, "grade returned a number float() refused (%s)" % exc
    return (value, None) if math.isfinite(value) else (None, "grade returned %r" % value)

def main():
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    request = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    limit = request["timeout_s"]
    if TIMER:
        signal.signal(signal.SIGALRM, _alarm)
    module = sys.modules["grader"] = types.ModuleType("grader")
    scope = module.__dict__
    _, error = call(lambda: exec(compile(request["source"], "grader.py", "exec"), scope), limit)
    if error is None and not callable(scope.get("grade")):
        error = "the source defines no function grade(sample, item)"
    if error is not None:
        out.write((json.dumps({"error": "the source failed: " + error}) + "\n").encode("utf-8"))
        return
    for i, case in enumerate(request["cases"]):
        value, error = call(lambda: scope["grade"](case["sample"], case["item"]), limit)
        if error is None:
            value, error = number(value)
        record = {"i": i, "error": error} if error is not None else {"i": i, "score": value}
        out.write((json.dumps(record) + "\n").encode("utf-8"))
        out.flush()

main()
"""


def run_python(
    source: str, samples: list[dict[str, Any]], items: list[dict[str, Any]], timeout_s: float
) -> tuple[list[float], list[str]]:
    """Scores of a python grader, all cases in one fresh interpreter (`-I`: no PYTHONPATH, no user site,
    no current directory on sys.path) in an empty working directory, with a minimal environment. It is
    a separate process, not a sandbox: the grader can do what this user can."""
    cases = [{"sample": s, "item": i} for s, i in zip(samples, items, strict=True)]
    request = json.dumps({"source": source, "cases": cases, "timeout_s": timeout_s}, default=str)
    deadline = timeout_s * (len(cases) + 1) + PYTHON_GRADER_STARTUP_S
    env = {k: os.environ[k] for k in _ENV_KEPT if k in os.environ}
    killed = False
    with tempfile.TemporaryDirectory(prefix="tunesmith-grader-") as cwd:
        process = subprocess.Popen(
            [sys.executable, "-I", "-c", _RUNNER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            start_new_session=True,  # its own process group, so a kill takes what it started too
        )
        try:
            out, err = process.communicate(request.encode("utf-8"), timeout=deadline)
        except subprocess.TimeoutExpired:
            killed = True
            _kill(process)
            try:
                out, err = process.communicate(timeout=PYTHON_GRADER_STARTUP_S)
            except subprocess.TimeoutExpired as exc:  # something it started still holds the pipes
                out, err = exc.output or b"", exc.stderr or b""
    return _read_scores(out, len(cases), _why_ended(killed, deadline, process.returncode, err))


def _kill(process: subprocess.Popen[bytes]) -> None:
    if hasattr(os, "killpg"):
        with contextlib.suppress(ProcessLookupError):  # it ended by itself meanwhile
            os.killpg(process.pid, signal.SIGKILL)
    else:
        process.kill()


def _why_ended(killed: bool, deadline: float, code: int | None, err: bytes) -> str:
    if killed:
        return f"the grader process stopped answering and was killed after {deadline:g} s"
    lines = err.decode("utf-8", "replace").strip().splitlines()
    return f"the grader process ended early (exit code {code}){': ' + lines[-1] if lines else ''}"


def _read_scores(out: bytes, count: int, ended: str) -> tuple[list[float], list[str]]:
    scores, reasons = [math.nan] * count, [ended] * count
    for line in out.decode("utf-8", "replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a partial last line of a killed process
        if not isinstance(record, dict) or ("error" not in record and "score" not in record):
            continue  # not the runner's (a grader that wrote to file descriptor 1 itself)
        if "i" not in record:
            return scores, [record["error"]] * count
        if "score" in record:
            scores[record["i"]], reasons[record["i"]] = float(record["score"]), ""
        else:
            reasons[record["i"]] = record["error"]
    return scores, [r for r in reasons if r]
