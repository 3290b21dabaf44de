"""OpenAI's RFT graders as the RL task's reward: each grader type and operation against hand-computed
scores, template filling, one validation error per bad key, the python grader in its own process
(its failures, time limit and non-numbers as NaN), and the reward module the RL task loads, keyed by
the same prompt strings the RL objective passes to its reward."""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from conftest import make_tiny_byte_tokenizer, write_jsonl
from tunesmith.service import grader_python, graders
from tunesmith.service.graders import (
    REWARD_MODULE,
    GraderError,
    grade_samples,
    reward_function,
    validate_grader,
    write_reward_module,
)

OUTPUT = "{{sample.output_text}}"


def check(operation: str, reference: str = "{{item.answer}}") -> dict[str, Any]:
    return {"type": "string_check", "name": "check", "input": OUTPUT, "reference": reference, "operation": operation}


def similarity(metric: str, **extra: Any) -> dict[str, Any]:
    return {
        "type": "text_similarity",
        "name": "similar",
        "input": OUTPUT,
        "reference": "{{item.reference}}",
        "evaluation_metric": metric,
        **extra,
    }


def python(source: str) -> dict[str, Any]:
    return {"type": "python", "name": "code", "source": source}


def score(grader: dict[str, Any], output: str, item: dict[str, Any], **kwargs: Any) -> float:
    (value,) = grade_samples(grader, [output], [item], **kwargs)
    return value


# ----------------------------------------------------------------------------- string_check


@pytest.mark.parametrize(
    ("operation", "output", "expected"),
    [
        ("eq", "Paris", 1.0),
        ("eq", "paris", 0.0),
        ("eq", "Paris.", 0.0),
        ("ne", "Paris", 0.0),
        ("ne", "Rome", 1.0),
        ("like", "The answer is Paris.", 1.0),
        ("like", "the answer is paris.", 0.0),
        ("ilike", "THE ANSWER IS PARIS", 1.0),
        ("ilike", "Rome", 0.0),
    ],
)
def test_string_check_operations(operation: str, output: str, expected: float) -> None:
    assert score(check(operation), output, {"answer": "Paris"}) == expected


# ----------------------------------------------------------------------------- text_similarity


@pytest.mark.parametrize(
    ("metric", "output", "reference", "expected"),
    [
        # Indel similarity: 2 edits over 8 characters.
        ("fuzzy_match", "abcd", "abce", 0.75),
        ("fuzzy_match", "same", "same", 1.0),
        ("bleu", "the cat sat on the mat", "the cat sat on the mat", 1.0),
        # Orders 1..2 (the shorter text has 2 words), both precisions 1; brevity penalty exp(1 - 6/2).
        ("bleu", "the cat", "the cat sat on the mat", math.exp(-2)),
        # p1 = 2/3, p2 = (1+1)/(2+1), p3 = (0+1)/(1+1); same length, no penalty.
        ("bleu", "the cat sat", "the cat ran", (2 / 3 * 2 / 3 * 1 / 2) ** (1 / 3)),
        ("bleu", "dogs bark", "cats meow", 0.0),
        # 3 shared 1..4-grams; 3 in the output, 6 in the reference: min(1, 1/2).
        ("gleu", "the cat", "the cat sat", 0.5),
        ("rouge_1", "the cat sat", "the cat ran", 2 / 3),
        ("rouge_1", "The Cat!", "the cat", 1.0),  # lowercased words, punctuation dropped
        ("rouge_2", "the cat sat", "the cat ran", 0.5),
        ("rouge_3", "a b c d", "a b c e", 0.5),
        ("rouge_4", "a b c d", "a b c e", 0.0),
        ("rouge_5", "a b c d e f", "a b c d e g", 0.5),
        # Longest common subsequence a-c-d (or a-b-d): 3 of 4 words each way.
        ("rouge_l", "a b c d", "a c b d", 0.75),
        ("rouge_l", "dogs bark", "cats meow", 0.0),
    ],
)
def test_text_similarity_metrics(metric: str, output: str, reference: str, expected: float) -> None:
    assert score(similarity(metric), output, {"reference": reference}) == pytest.approx(expected)


def test_pass_threshold_is_kept_but_the_reward_is_the_score() -> None:
    grader = similarity("fuzzy_match", pass_threshold=0.9)
    assert validate_grader(grader)["pass_threshold"] == 0.9
    assert score(grader, "abcd", {"reference": "abce"}) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- templates


@pytest.mark.parametrize(
    ("reference", "item"),
    [
        ("{{item.answer.city}}", {"answer": {"city": "Paris"}}),
        ("{{ item.answer.city }}", {"answer": {"city": "Paris"}}),
        ("{{item.aliases[1]}}", {"aliases": ["Lutetia", "Paris"]}),
        ("{{item.aliases.1}}", {"aliases": ["Lutetia", "Paris"]}),
        ("{{item.a.b.c}}", {"a": {"b": {"c": "Paris"}}}),
    ],
)
def test_templates_reach_nested_item_fields(reference: str, item: dict[str, Any]) -> None:
    grader = check("eq", reference)
    assert score(grader, "Paris", item) == 1.0
    assert score(grader, "Rome", item) == 0.0


def test_templates_mix_text_and_values_and_write_non_strings_as_json() -> None:
    grader = {**check("eq", "{{item.n}} is {{item.unit}}"), "input": "{{sample.output_text}} is {{item.unit}}"}
    assert score(grader, "42", {"n": 42, "unit": "m"}) == 1.0
    assert score(check("eq", "{{item.tags}}"), '["a", "b"]', {"tags": ["a", "b"]}) == 1.0


def test_templates_read_the_output_as_json() -> None:
    grader = {**check("eq"), "input": "{{sample.output_json.city}}"}
    assert score(grader, '{"city": "Paris"}', {"answer": "Paris"}) == 1.0
    assert math.isnan(score(grader, "Paris", {"answer": "Paris"}))  # not JSON: no output_json


def test_a_missing_or_null_item_field_scores_nan_and_says_which(capsys: pytest.CaptureFixture[str]) -> None:
    scores = grade_samples(check("eq"), ["Paris", "Paris", "Paris"], [{"answer": "Paris"}, {}, {"answer": None}])
    assert scores[0] == 1.0
    assert math.isnan(scores[1]) and math.isnan(scores[2])
    assert "2 of 3 completions got no score" in capsys.readouterr().err
    assert math.isnan(score(check("eq", "{{item.aliases[5]}}"), "Paris", {"aliases": ["Paris"]}))


# ----------------------------------------------------------------------------- validation

GOOD_SOURCE = "def grade(sample, item):\n    return 1.0\n"


@pytest.mark.parametrize(
    ("grader", "message"),
    [
        (["not", "an", "object"], 'grader: must be an object with a "type", got list'),
        ({"name": "x"}, "grader.type: required, use one of string_check, text_similarity, python"),
        ({**check("eq"), "type": "regex"}, "grader.type: unknown type 'regex'"),
        ({**check("eq"), "type": ["x"]}, "grader.type: unknown type ['x']"),
        ({**check("eq"), "type": "score_model"}, "grader.type: score_model is not supported here"),
        ({**check("eq"), "type": "multi"}, "grader.type: multi is not supported here"),
        ({k: v for k, v in check("eq").items() if k != "name"}, "grader.name: required, a string"),
        ({**check("eq"), "input": 3}, "grader.input: required, a string"),
        (check("contains"), "grader.operation: must be one of eq, ne, like, ilike"),
        (check("eq", "{{sample.foo}}"), "grader.reference: {{sample.foo}} is not a variable here"),
        (check("eq", "{{sample.output_text.x}}"), "grader.reference: {{sample.output_text.x}} is not a variable"),
        (check("eq", "{{model.output}}"), "grader.reference: {{model.output}} is not a variable here"),
        (check("eq", "{{item}}"), "grader.reference: {{item}} is not a variable here"),
        (check("eq", "{{item.answer"), "grader.reference: has a {{ without its }}"),
        ({**check("eq"), "weight": 2}, "grader.weight: unknown key for a string_check grader"),
        (similarity("levenshtein"), "grader.evaluation_metric: must be one of fuzzy_match, bleu, gleu, rouge_1"),
        (similarity("cosine"), "grader.evaluation_metric: cosine is not supported here (it needs an embedding"),
        (similarity("meteor"), "grader.evaluation_metric: meteor is not supported here"),
        (similarity("bleu", pass_threshold="high"), "grader.pass_threshold: must be a number"),
        (similarity("bleu", pass_threshold=True), "grader.pass_threshold: must be a number"),
        ({"type": "python", "name": "code"}, "grader.source: required, Python code defining grade(sample, item)"),
        (python("def grade(:\n    pass\n"), "grader.source: not valid Python (line 1"),
        (python("def score(sample, item):\n    return 1.0\n"), "grader.source: defines no top-level function grade"),
        (python("x" * (graders.PYTHON_SOURCE_MAX_BYTES + 1)), "grader.source: longer than 256 KiB"),
        ({**python(GOOD_SOURCE), "image_tag": 3}, "grader.image_tag: must be a string"),
        ({**python(GOOD_SOURCE), "input": OUTPUT}, "grader.input: unknown key for a python grader"),
    ],
)
def test_each_bad_key_is_named_in_one_line(grader: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        validate_grader(grader)
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)
    assert isinstance(caught.value, GraderError) and caught.value.param == message.split(":")[0]


def test_every_problem_is_reported_at_once() -> None:
    bad = {k: v for k, v in check("contains", "{{sample.foo}}").items() if k != "name"}
    with pytest.raises(GraderError) as caught:
        validate_grader(bad)
    assert str(caught.value).count("; ") == 2
    for key in ("grader.name", "grader.reference", "grader.operation"):
        assert key in str(caught.value)


def test_validation_returns_the_known_keys_normalised_without_touching_the_input() -> None:
    raw = similarity("rouge_l", pass_threshold=1)
    assert validate_grader(raw) == {**raw, "pass_threshold": 1.0}
    assert isinstance(validate_grader(raw)["pass_threshold"], float) and raw["pass_threshold"] == 1
    assert list(validate_grader(check("ilike"))) == ["type", "name", "input", "reference", "operation"]
    assert validate_grader({**python(GOOD_SOURCE), "image_tag": "2025-05-08"})["image_tag"] == "2025-05-08"
    assert validate_grader(python("from math import sqrt as grade\n"))["source"].startswith("from math")


# ----------------------------------------------------------------------------- python graders

MATCH = """
def grade(sample, item):
    print("graders may print; it must not spoil the scores")
    return 1.0 if sample["output_text"].strip() == item["answer"] else 0.0
"""


def test_python_grader_scores_against_the_row() -> None:
    scores = grade_samples(python(MATCH), ["Paris", " Rome ", "Paris"], [{"answer": "Paris"}, {"answer": "Rome"}, {}])
    assert scores[:2] == [1.0, 1.0]
    assert math.isnan(scores[2])  # KeyError in grade


def test_python_grader_that_raises_gives_nan_for_that_completion_only(capsys: pytest.CaptureFixture[str]) -> None:
    source = """
def grade(sample, item):
    if sample["output_text"] == "boom":
        raise RuntimeError("no")
    return 0.5
"""
    scores = grade_samples(python(source), ["ok", "boom", "ok"], [{}] * 3)
    assert scores[0] == scores[2] == 0.5 and math.isnan(scores[1])
    assert "RuntimeError: no" in capsys.readouterr().err


def test_python_grader_that_never_returns_gives_nan_within_the_limit() -> None:
    source = "def grade(sample, item):\n    while sample['output_text'] == 'loop':\n        pass\n    return 1.0\n"
    start = time.monotonic()
    scores = grade_samples(python(source), ["loop", "ok"], [{}, {}], timeout_s=0.5)
    assert math.isnan(scores[0]) and scores[1] == 1.0  # the limit is per call: the next completion is graded
    assert time.monotonic() - start < 3.0


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="process groups are POSIX")
def test_a_grader_that_blocks_the_alarm_is_killed_and_keeps_the_scores_it_gave(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(grader_python, "PYTHON_GRADER_STARTUP_S", 0.5)
    source = """
import signal

def grade(sample, item):
    if sample["output_text"] == "stuck":
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        while True:
            pass
    return 1.0
"""
    start = time.monotonic()
    scores = grade_samples(python(source), ["ok", "stuck", "never reached"], [{}] * 3, timeout_s=0.2)
    assert scores[0] == 1.0 and math.isnan(scores[1]) and math.isnan(scores[2])
    assert time.monotonic() - start < 0.2 * 4 + 0.5 + 2.0
    assert "killed after" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["'1.0'", "None", "True", "[1.0]", "float('nan')", "float('inf')"])
def test_python_grader_that_returns_no_finite_number_gives_nan(value: str) -> None:
    assert math.isnan(score(python(f"def grade(sample, item):\n    return {value}\n"), "x", {}))


def test_python_grader_ints_are_numbers() -> None:
    assert score(python("def grade(sample, item):\n    return 1\n"), "x", {}) == 1.0


def test_python_grader_source_that_fails_gives_nan_for_all(capsys: pytest.CaptureFixture[str]) -> None:
    scores = grade_samples(
        python("raise ImportError('gone')\ndef grade(sample, item):\n    return 1.0\n"), ["a", "b"], [{}, {}]
    )
    assert all(math.isnan(s) for s in scores)
    assert "the source failed: ImportError: gone" in capsys.readouterr().err


def test_python_grader_runs_in_one_other_fresh_process_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNESMITH_TEST_SECRET", "do not pass me on")
    source = "import os\ndef grade(sample, item):\n    return float(os.getpid())\n"
    pids = grade_samples(python(source), ["a", "b", "c"], [{}] * 3)
    assert len(set(pids)) == 1 and pids[0] != float(os.getpid())
    fresh = """
import os, sys
def grade(sample, item):
    alone = "tunesmith" not in sys.modules and "pytest" not in sys.modules
    return float(alone and "TUNESMITH_TEST_SECRET" not in os.environ)
"""
    assert score(python(fresh), "x", {}) == 1.0


def test_python_grader_can_use_installed_packages_as_in_openais_example() -> None:
    source = """
from rapidfuzz import fuzz

def grade(sample, item):
    return fuzz.ratio(sample["output_text"], item["ref"]) / 100
"""
    assert score(python(source), "abcd", {"ref": "abce"}) == pytest.approx(0.75)


# ----------------------------------------------------------------------------- the RL reward

ROWS = [
    {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}],
        "answer": "Paris",
    },
    {"prompt": "Capital of Italy?", "answer": "Rome"},
    {"messages": [{"role": "user", "content": "Capital of France?"}], "answer": "Lyon"},  # same prompt: unused
    {"instruction": "Capital of Spain?", "input": "One word.", "answer": "Madrid"},
]


def test_reward_finds_each_completions_row_by_its_prompt(capsys: pytest.CaptureFixture[str]) -> None:
    reward = reward_function(check("eq"), ROWS)
    prompts = ["Capital of France?", "Capital of Italy?", "Capital of Spain?\n\nOne word.", "Capital of Peru?"]
    scores = reward(prompts, ["Paris", "Rome", "Madrid", "Lima"])
    assert scores[:3] == [1.0, 1.0, 1.0]  # France: the first row with that prompt (Paris, not Lyon)
    assert math.isnan(scores[3])
    assert "first prompt: 'Capital of Peru?'" in capsys.readouterr().err
    assert reward(["Capital of France?"], ["Lyon"]) == [0.0]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward(["a", "b"], ["x"])


def test_reward_grades_a_whole_batch_in_one_process() -> None:
    reward = reward_function(python("import os\ndef grade(sample, item):\n    return float(os.getpid())\n"), ROWS)
    pids = reward(["Capital of France?", "Capital of Italy?", "Capital of France?"], ["a", "b", "c"])
    assert len(set(pids)) == 1


def test_reward_is_keyed_by_the_prompts_the_rl_objective_passes(tmp_path: Path) -> None:
    from tunesmith.config import DataConfig
    from tunesmith.data.load import read_sft_examples
    from tunesmith.tasks.rl.objective import RlObjective

    path = write_jsonl(tmp_path / "rft.jsonl", ROWS)
    examples = read_sft_examples(str(path), DataConfig(train=str(path)), require_completion=False)  # as RlTask reads
    objective = RlObjective(make_tiny_byte_tokenizer(), 64, SimpleNamespace(), reward=None)  # type: ignore[arg-type]
    prompts = [item["prompt"] for item in objective.encode(examples)]
    reward = reward_function(check("eq"), [json.loads(line) for line in path.read_text().splitlines()])
    assert reward(prompts, ["Paris", "Rome", "Paris", "Madrid"]) == [1.0, 1.0, 1.0, 1.0]
    assert reward(prompts, ["Rome", "Paris", "Lyon", "Paris"]) == [0.0, 0.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- the reward module


@pytest.fixture()
def reward_module(monkeypatch: pytest.MonkeyPatch):
    """Imports the reward module of a job directory, fresh each time (every job's module has one name)."""

    def load(directory: Path) -> Any:
        sys.modules.pop(REWARD_MODULE, None)
        monkeypatch.syspath_prepend(str(directory))
        return importlib.import_module(REWARD_MODULE)

    yield load
    sys.modules.pop(REWARD_MODULE, None)


def test_written_reward_module_scores_training_and_validation_rows(tmp_path: Path, reward_module: Any) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    validation = write_jsonl(tmp_path / "validation.jsonl", ROWS[3:])
    spec = write_reward_module(tmp_path / "job-1", check("ilike"), train, validation)
    assert spec == f"{REWARD_MODULE}:reward"
    saved = json.loads((tmp_path / "job-1" / "grader.json").read_text())
    assert saved["grader"] == check("ilike") and saved["data_files"] == [str(train), str(validation)]
    module = reward_module(tmp_path / "job-1")
    prompts = ["Capital of France?", "Capital of Italy?", "Capital of Spain?\n\nOne word."]
    assert module.reward(prompts, ["It is PARIS.", "Milan", "madrid"]) == [1.0, 0.0, 1.0]


def test_the_rl_task_loads_the_written_module_as_its_reward(
    tmp_path: Path, reward_module: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tunesmith.tasks.rl.rewards import load_reward

    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    spec = write_reward_module(tmp_path / "job-2", python(MATCH), train)
    reward_module(tmp_path / "job-2")  # puts the directory on sys.path, as PYTHONPATH does for the worker
    loaded = load_reward(spec)
    assert loaded.record["file"] == str(tmp_path / "job-2" / f"{REWARD_MODULE}.py")
    assert loaded.bind(None)(["Capital of Italy?", "Capital of France?"], ["Rome", "Lyon"]) == [1.0, 0.0]  # type: ignore[arg-type]


def test_a_changed_grader_json_is_refused_on_import(tmp_path: Path, reward_module: Any) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS)
    write_reward_module(tmp_path / "job", check("eq"), train)
    spec_file = tmp_path / "job" / "grader.json"
    spec_file.write_text(spec_file.read_text().replace('"eq"', '"ne"'))
    with pytest.raises(ValueError, match="changed after"):
        reward_module(tmp_path / "job")


def test_an_invalid_grader_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(GraderError, match="grader.operation"):
        write_reward_module(tmp_path / "job", check("contains"), tmp_path / "train.jsonl")
    assert not (tmp_path / "job").exists()
