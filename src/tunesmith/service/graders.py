"""OpenAI's reinforcement fine-tuning graders (string_check, text_similarity, python) as the reward
of tunesmith's RL task (`rl.reward = module:function`).

A grader names the data row's fields as `{{item.FIELD}}` (nested: `{{item.a.b}}`, `{{item.a.0}}`)
and the model's output as `{{sample.output_text}}` (or `{{sample.output_json...}}` when it is JSON):
https://platform.openai.com/docs/guides/graders. The RL objective calls its reward with each
completion's prompt string, so `reward_function` finds a completion's row by that string.
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunesmith.data.readers import Row
from tunesmith.data.sft import SftExample, to_sft_examples
from tunesmith.runs import atomic_write_text
from tunesmith.service.grader_python import PYTHON_GRADER_STARTUP_S, PYTHON_GRADER_TIMEOUT_S, run_python
from tunesmith.service.grader_similarity import METRICS

__all__ = [
    "GRADER_TYPES",
    "OPERATIONS",
    "PYTHON_GRADER_STARTUP_S",
    "PYTHON_GRADER_TIMEOUT_S",
    "PYTHON_SOURCE_MAX_BYTES",
    "REWARD_MODULE",
    "SIMILARITY_METRICS",
    "GraderError",
    "RewardFunction",
    "grade_samples",
    "reward_function",
    "validate_grader",
    "write_reward_module",
]

RewardFunction = Callable[[Sequence[str], Sequence[str]], list[float]]

GRADER_TYPES = ("string_check", "text_similarity", "python")
OPERATIONS = ("eq", "ne", "like", "ilike")
# OpenAI's list also has cosine (needs an embedding model) and meteor (needs WordNet's synonyms).
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l")
_NOT_HERE = {
    "score_model": "it needs a hosted model to grade",
    "label_model": "it needs a hosted model to grade",
    "multi": "combine the graders in one python grader instead",
    "cosine": "it needs an embedding model",
    "meteor": "it needs WordNet's synonyms",
}
_KEYS = {
    "string_check": ("type", "name", "input", "reference", "operation"),
    "text_similarity": ("type", "name", "input", "reference", "evaluation_metric", "pass_threshold"),
    "python": ("type", "name", "source", "image_tag"),
}

PYTHON_SOURCE_MAX_BYTES = 256 * 1024  # OpenAI's limit on a python grader's source
REWARD_MODULE = "tunesmith_grader_reward"


class GraderError(ValueError):
    """A grader the API cannot use; the message is one line naming the bad key(s), `param` the first."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{key}: {why}" for key, why in problems))
        self.param = problems[0][0]


class _Missing(Exception):
    """A template names a value the row or the sample does not have."""


# ----------------------------------------------------------------------------- validation


def validate_grader(spec: dict[str, Any]) -> dict[str, Any]:
    """Check a grader as the API receives it (`method.reinforcement.grader`), every problem at once.

    Returns:
        The grader with only its known keys, in a fixed order; `pass_threshold` as a float.

    Raises:
        GraderError (a ValueError): one line, e.g. `grader.operation: must be one of eq, ne, like, ilike`.
    """
    if not isinstance(spec, dict):
        raise GraderError([("grader", f'must be an object with a "type", got {type(spec).__name__}')])
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _KEYS:
        use = f"use one of {', '.join(GRADER_TYPES)}"
        if kind is None:
            raise GraderError([("grader.type", f"required, {use}")])
        known = isinstance(kind, str) and kind in _NOT_HERE
        why = f"{kind} is not supported here ({_NOT_HERE[kind]})" if known else f"unknown type {kind!r}"
        raise GraderError([("grader.type", f"{why}, {use}")])
    problems = [
        (f"grader.{key}", f"unknown key for a {kind} grader (its keys are {', '.join(_KEYS[kind])})")
        for key in spec
        if key not in _KEYS[kind]
    ]
    if not isinstance(spec.get("name"), str):
        problems.append(("grader.name", "required, a string"))
    if kind == "python":
        problems += _source_problems(spec.get("source"))
        if "image_tag" in spec and not isinstance(spec["image_tag"], str):
            problems.append(("grader.image_tag", "must be a string (it is ignored here)"))
    else:
        problems += _template_problems("grader.input", spec.get("input"))
        problems += _template_problems("grader.reference", spec.get("reference"))
    if kind == "string_check" and spec.get("operation") not in OPERATIONS:
        problems.append(("grader.operation", f"must be one of {', '.join(OPERATIONS)}"))
    if kind == "text_similarity":
        metric = spec.get("evaluation_metric")
        if metric not in SIMILARITY_METRICS:
            note = f"{metric} is not supported here ({_NOT_HERE[metric]}), " if metric in ("cosine", "meteor") else ""
            problems.append(("grader.evaluation_metric", f"{note}must be one of {', '.join(SIMILARITY_METRICS)}"))
        threshold = spec.get("pass_threshold", 0.0)
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not math.isfinite(threshold):
            problems.append(("grader.pass_threshold", "must be a number"))
    if problems:
        raise GraderError(problems)
    normal = {key: spec[key] for key in _KEYS[kind] if key in spec}
    if "pass_threshold" in normal:  # kept for the record: the reward is the score itself, as in OpenAI's RFT
        normal["pass_threshold"] = float(normal["pass_threshold"])
    return normal


def _template_problems(key: str, text: Any) -> list[tuple[str, str]]:
    if not isinstance(text, str):
        return [(key, 'required, a string (e.g. "{{sample.output_text}}" or "{{item.answer}}")')]
    problems = [(key, why) for m in _TEMPLATE.finditer(text) if (why := _variable_problem(m.group(1)))]
    if "{{" in _TEMPLATE.sub("", text):
        problems.append((key, "has a {{ without its }}"))
    return problems


def _variable_problem(expression: str) -> str | None:
    path = _path(expression)
    if path[0] == "item" and len(path) > 1 and all(path):
        return None
    if path[0] == "sample" and path[1:2] == ["output_text"] and len(path) == 2:
        return None
    if path[0] == "sample" and path[1:2] == ["output_json"] and all(path):
        return None
    return (
        f"{{{{{expression.strip()}}}}} is not a variable here (use {{{{item.FIELD}}}}, nested as item.a.b, "
        "{{sample.output_text}} or {{sample.output_json}})"
    )


def _source_problems(source: Any) -> list[tuple[str, str]]:
    if not isinstance(source, str) or not source.strip():
        return [("grader.source", "required, Python code defining grade(sample, item) -> float")]
    if len(source.encode("utf-8")) > PYTHON_SOURCE_MAX_BYTES:
        return [("grader.source", f"longer than {PYTHON_SOURCE_MAX_BYTES // 1024} KiB")]
    try:
        module = ast.parse(source)
    except SyntaxError as exc:
        return [("grader.source", f"not valid Python (line {exc.lineno}: {exc.msg})")]
    except ValueError as exc:  # a NUL byte, before Python 3.12
        return [("grader.source", f"not valid Python ({exc})")]
    defined: set[str] = set()
    for node in module.body:
        if isinstance(node, ast.FunctionDef):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {target.id for target in node.targets if isinstance(target, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            defined |= {alias.asname or alias.name for alias in node.names}
    if "grade" not in defined:
        return [("grader.source", "defines no top-level function grade(sample, item) -> float")]
    return []


# ----------------------------------------------------------------------------- templates

_TEMPLATE = re.compile(r"\{\{(.*?)\}\}")


def _path(expression: str) -> list[str]:
    """`item.a[0].b` -> ["item", "a", "0", "b"]."""
    return re.sub(r"\[(\d+)\]", r".\1", expression.strip()).split(".")


def _lookup(root: Any, path: Sequence[str]) -> Any:
    value = root
    for step in path:
        if isinstance(value, dict) and step in value:
            value = value[step]
        elif isinstance(value, list) and step.isdigit() and int(step) < len(value):
            value = value[int(step)]
        else:
            raise _Missing(f"{'.'.join(path)} is missing")
    if value is None:
        raise _Missing(f"{'.'.join(path)} is null")
    return value


def _fill(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """The template with each `{{namespace.path}}` replaced: strings as they are, other values as JSON.

    Raises:
        _Missing: the row (or the sample) has no such value, or it is null.
    """

    def value(match: re.Match[str]) -> str:
        found = _lookup({"item": item, "sample": sample}, _path(match.group(1)))
        return found if isinstance(found, str) else json.dumps(found)

    return _TEMPLATE.sub(value, template)


def _sample(output: str) -> dict[str, Any]:
    """The `sample` namespace of one completion: its text, and its JSON value when it parses (else None)."""
    try:
        parsed = json.loads(output)
    except ValueError:
        parsed = None
    return {"output_text": output, "output_json": parsed}


def _compare(spec: dict[str, Any], text: str, reference: str) -> float:
    if spec["type"] == "text_similarity":
        return METRICS[spec["evaluation_metric"]](text, reference)
    operation = spec["operation"]
    passed = {
        "eq": text == reference,
        "ne": text != reference,
        "like": reference in text,
        "ilike": reference.lower() in text.lower(),
    }[operation]
    return 1.0 if passed else 0.0


# ----------------------------------------------------------------------------- grading


def grade_samples(
    grader: dict[str, Any],
    outputs: Sequence[str],
    items: Sequence[dict[str, Any]],
    *,
    timeout_s: float = PYTHON_GRADER_TIMEOUT_S,
) -> list[float]:
    """One score per (model output, data row); NaN where the grader could not score (a missing field,
    a python grader that raised, ran over `timeout_s`, or gave no number). A warning on stderr says how
    many and why the first one failed.

    Raises:
        GraderError: the grader is not valid (see `validate_grader`).
    """
    spec = validate_grader(grader)
    if len(outputs) != len(items):
        raise ValueError(f"{len(outputs)} outputs but {len(items)} rows; give one row per output")
    samples = [_sample(output) for output in outputs]
    if not samples:
        return []
    if spec["type"] == "python":
        scores, problems = run_python(spec["source"], samples, list(items), timeout_s)
    else:
        scores, problems = [], []
        for sample, item in zip(samples, items, strict=True):
            try:
                text, reference = _fill(spec["input"], sample, item), _fill(spec["reference"], sample, item)
            except _Missing as exc:
                scores.append(math.nan)
                problems.append(str(exc))
                continue
            scores.append(_compare(spec, text, reference))
    if problems:
        print(
            f"warning: grader {spec['name']!r}: {len(problems)} of {len(scores)} completions got no score "
            f"(NaN, left out of the update); first: {problems[0]}",
            file=sys.stderr,
        )
    return scores


# ----------------------------------------------------------------------------- the RL reward


def reward_function(
    grader: dict[str, Any], rows: Sequence[dict[str, Any]], *, timeout_s: float = PYTHON_GRADER_TIMEOUT_S
) -> RewardFunction:
    """The RL task's reward `(prompts, completions) -> scores` that grades each completion against the
    row it was sampled for.

    The RL objective passes each completion's prompt as the content of its row's last non-assistant
    message (the raw text, not the rendered chat template), so rows are indexed by that string: the
    content of the last user (or system) message, or the `prompt` of a prompt/completion row. Where two
    rows share a prompt, the first row is the one graded against. A prompt no row has scores NaN.

    Args:
        grader: the grader as the API received it (validated here).
        rows: the data rows, as read from the files the RL task reads (every field kept: `item`).
        timeout_s: a python grader's limit per call (see PYTHON_GRADER_TIMEOUT_S).

    Raises:
        GraderError: the grader is not valid.
        DataError: a row the RL task could not read either.
    """
    spec = validate_grader(grader)
    index = _prompt_index(rows)

    def reward(prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        found = [k for k, prompt in enumerate(prompts) if prompt in index]
        scores = [math.nan] * len(prompts)
        graded = grade_samples(
            spec, [completions[k] for k in found], [index[prompts[k]] for k in found], timeout_s=timeout_s
        )
        for k, score in zip(found, graded, strict=True):
            scores[k] = score
        if len(found) < len(prompts):
            missing = next(p for p in prompts if p not in index)
            print(
                f"warning: grader {spec['name']!r}: {len(prompts) - len(found)} completion(s) of prompts no data "
                f"row has got no score (NaN); first prompt: {missing[:80]!r}",
                file=sys.stderr,
            )
        return scores

    return reward


def _prompt_of(example: SftExample) -> str | None:
    """The prompt string RlObjective.encode gives its reward for this example (None: a text row, no prompt)."""
    if not example.messages:
        return None
    messages = tuple(m for m in example.messages if m.role != "assistant") or example.messages
    return messages[-1].content


def _prompt_index(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Prompt string -> the first row with that prompt, read as the RL task reads rows."""
    examples = to_sft_examples([Row(row, f"row {k}") for k, row in enumerate(rows)], require_completion=False)
    index: dict[str, dict[str, Any]] = {}
    for row, example in zip(rows, examples, strict=True):
        prompt = _prompt_of(example)
        if prompt is not None:
            index.setdefault(prompt, row)
    return index


_MODULE_SOURCE = '''"""The reward of one reinforcement fine-tuning job: the OpenAI grader in grader.json, beside this
file, scoring each completion against its data row. Written by tunesmith.service.graders; the RL task
loads it as rl.reward = {module}:reward."""

import hashlib
import json
from pathlib import Path

from tunesmith.data.readers import read_rows
from tunesmith.service.graders import reward_function

# grader.json's sha256: this file's own hash, which the run's manifest records, then names the grader.
_SPEC_SHA256 = "{digest}"
_SPEC_FILE = Path(__file__).with_name("grader.json")
_SPEC_BYTES = _SPEC_FILE.read_bytes()
if hashlib.sha256(_SPEC_BYTES).hexdigest() != _SPEC_SHA256:
    raise ValueError(f"{{_SPEC_FILE}} changed after {{__file__}} was written; write both again")
_SPEC = json.loads(_SPEC_BYTES)
_ROWS = [row.data for path in _SPEC["data_files"] for row in read_rows(path)]
_REWARD = reward_function(_SPEC["grader"], _ROWS, timeout_s=_SPEC["timeout_s"])


def reward(prompts, completions):
    return _REWARD(prompts, completions)
'''


def write_reward_module(
    directory: Path,
    grader: dict[str, Any],
    training_file: Path,
    validation_file: Path | None = None,
    *,
    timeout_s: float = PYTHON_GRADER_TIMEOUT_S,
) -> str:
    """Write `directory/tunesmith_grader_reward.py` and `directory/grader.json`: a module whose `reward`
    grades completions against the rows of the training (and validation) file, read with the RL task's
    reader when the module is imported. Both files are written atomically.

    The caller puts `directory` (one per job) on the training process's PYTHONPATH; the module's name is
    the same for every job, so one process must not import two jobs' modules.

    Returns:
        The `rl.reward` spec: "tunesmith_grader_reward:reward".

    Raises:
        GraderError: the grader is not valid.
    """
    spec = validate_grader(grader)
    files = [str(Path(f).resolve()) for f in (training_file, validation_file) if f is not None]
    text = json.dumps({"grader": spec, "data_files": files, "timeout_s": timeout_s}, indent=2) + "\n"
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / "grader.json", text)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    atomic_write_text(directory / f"{REWARD_MODULE}.py", _MODULE_SOURCE.format(module=REWARD_MODULE, digest=digest))
    return f"{REWARD_MODULE}:reward"
