"""Many adapters, one base: several runs on one base model loaded as named peft adapters, switched by
name without loading the base again; each answers exactly as its run alone does. Runs that cannot
share a base are refused in one line (exit 2 through the CLI)."""

from __future__ import annotations

import io
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

import tunesmith
from conftest import run_cli, sentiment_rows, write_jsonl
from tunesmith import registry
from tunesmith.api import Sampling, load_adapters
from tunesmith.inference import load_trained

TEXTS = ["a good movie", "the plot was dull", "really superb actors", "it was messy and flat"]
PROMPTS = ["colour of red 5?", "colour of gold 2?"]


def _train(tmp: Path, **config: object) -> Path:
    # Named after its folder: runs started within one second would otherwise share a name.
    return tunesmith.train(output={"dir": str(tmp), "name": tmp.name}, **config).run_dir


@pytest.fixture(scope="module")
def classifiers(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Runs on the tiny BERT: two LoRA runs (two labels; three labels) and an IA3 run."""
    tmp = tmp_path_factory.mktemp("classifiers")
    two = write_jsonl(tmp / "two.jsonl", sentiment_rows(64))
    three = [{**row, "label": "neutral" if i % 3 == 2 else row["label"]} for i, row in enumerate(sentiment_rows(96, 1))]
    base = {
        "model": str(tiny_bert),
        "data": {"train": str(two), "validation": 0.25, "max_length": 16},
        "train": {"epochs": 1, "batch_size": 8, "lr": 5e-3, "precision": "fp32"},
        "eval": {"baseline": False},
    }
    three_labels = {**base, "data": {**base["data"], "train": str(write_jsonl(tmp / "three.jsonl", three))}}
    return {
        "lora": _train(tmp / "a", method="lora", **base),
        "lora3": _train(tmp / "b", method={"name": "lora", "r": 4}, **three_labels),
        "ia3": _train(tmp / "c", method="ia3", **base),
    }


def _sft_rows(answer: str | None) -> list[dict]:
    """Questions answered with the colour in them, or always with `answer`."""
    words = ["red", "blue", "green", "gold"]
    return [{"prompt": f"colour of {words[i % 4]} {i}?", "completion": answer or words[i % 4]} for i in range(32)]


def _sft_pair(method: str, model: Path, tmp: Path) -> list[Path]:
    """Two instruction-tuned runs of `method` on `model`, taught different answers."""
    runs = []
    for name, answer in (("colours", None), ("always", "no")):
        config = {
            "model": str(model),
            "task": "sft",
            "method": method,
            "data": {"train": str(write_jsonl(tmp / f"{name}.jsonl", _sft_rows(answer))), "max_length": 48},
            "train": {"epochs": 1, "batch_size": 8, "lr": 2e-2, "precision": "fp32"},
            "eval": {"samples": 0, "exact_match_rows": 2},
        }
        config["data"]["packing"] = method == "lora"  # prompt and prefix tuning refuse packing
        runs.append(_train(tmp / name, **config))
    return runs


@pytest.fixture(scope="module")
def lora_sft(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return _sft_pair("lora", tiny_llama, tmp_path_factory.mktemp("sft-lora"))


@pytest.fixture(scope="module", params=["lora", "prefix-tuning"])
def sft_runs(request: pytest.FixtureRequest, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    if request.param == "lora":
        return request.getfixturevalue("lora_sft")  # type: ignore[no-any-return]
    return _sft_pair(request.param, tiny_llama, tmp_path_factory.mktemp(f"sft-{request.param}"))


def _count_base_loads(monkeypatch: pytest.MonkeyPatch, task: str) -> list[int]:
    """Count the task's `build_model` calls (each loads the base model from disk)."""
    calls: list[int] = []
    cls = registry.task_class(task)
    build = cls.build_model

    def counted(self, num_labels):
        calls.append(num_labels)
        return build(self, num_labels)

    monkeypatch.setattr(cls, "build_model", counted)
    return calls


def test_two_lora_classifiers_predict_exactly_as_each_alone(classifiers: dict[str, Path], monkeypatch) -> None:
    a, b = classifiers["lora"], classifiers["lora3"]
    alone = {a.name: tunesmith.predict(a, TEXTS), b.name: tunesmith.predict(b, TEXTS)}
    assert alone[a.name][0]["scores"].keys() != alone[b.name][0]["scores"].keys()  # two labels; three

    loads = _count_base_loads(monkeypatch, "classification")
    loaded = load_adapters([a, b])
    assert len(loads) == 1  # the base loaded once for both runs
    assert loaded.names == [a.name, b.name] and loaded.active == a.name
    for name in [a.name, b.name, a.name, b.name]:  # back and forth
        shared = tunesmith.predict(loaded, TEXTS, adapter=name)
        for got, want in zip(shared, alone[name], strict=True):
            assert got["label"] == want["label"] and got["scores"].keys() == want["scores"].keys()
            assert all(abs(got["scores"][k] - want["scores"][k]) <= 1e-6 for k in want["scores"])
    assert len(loads) == 1

    # One model: a base weight is the very same tensor under either adapter; each run has its own head.
    def pointers(model) -> tuple[int, int]:
        base_weight = model.backbone.get_base_model().embeddings.word_embeddings.weight
        return base_weight.data_ptr(), model.head.weight.data_ptr()

    (base_a, head_a), (base_b, head_b) = pointers(loaded.use(a.name).model), pointers(loaded.use(b.name).model)
    assert base_a == base_b and head_a != head_b
    assert loaded.runs[a.name].model is loaded.runs[b.name].model and len(loaded.use().model.backbone.peft_config) == 2


@pytest.mark.parametrize("method", ["ia3", "prompt-tuning"])
def test_ia3_and_prompt_tuning_classifiers_share_a_base(
    method: str, tiny_bert: Path, tmp_path: Path, monkeypatch
) -> None:
    runs = []
    for seed, rows in ((0, sentiment_rows(48)), (1, sentiment_rows(48, seed=5)[::-1])):
        data = {"train": str(write_jsonl(tmp_path / f"{seed}.jsonl", rows)), "validation": 0.25, "max_length": 16}
        train = {"max_steps": 4, "batch_size": 8, "lr": 5e-2, "seed": seed, "precision": "fp32"}
        runs.append(_train(tmp_path / str(seed), model=str(tiny_bert), method=method, data=data, train=train))
    alone = [tunesmith.predict(run, TEXTS) for run in runs]
    assert alone[0] != alone[1]

    loads = _count_base_loads(monkeypatch, "classification")
    loaded = load_adapters({"first": runs[0], "second": runs[1]})
    for name, want in [("second", alone[1]), ("first", alone[0]), ("second", alone[1])]:
        for got, row in zip(tunesmith.predict(loaded, TEXTS, adapter=name), want, strict=True):
            assert got["label"] == row["label"]
            assert all(abs(got["scores"][k] - row["scores"][k]) <= 1e-6 for k in row["scores"])
    assert len(loads) == 1


def test_runs_by_name_and_by_mapping(classifiers: dict[str, Path]) -> None:
    a, b = classifiers["lora"], classifiers["lora3"]
    want = tunesmith.predict(b, TEXTS[:1])
    assert tunesmith.predict([str(a), f"mine={b}"], TEXTS[:1], adapter="mine") == want
    loaded = load_adapters({"x": a, "y": b}, active="y")
    assert loaded.active == "y" and tunesmith.predict(loaded, TEXTS[:1]) == want


def _states(trained, prompt: str) -> torch.Tensor:
    """The final hidden states (1, T, H) the run's model gives for a prompt."""
    batch = trained.objective.tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        return trained.model(batch["input_ids"], batch["attention_mask"]).hidden


def test_two_sft_runs_generate_exactly_as_each_alone(sft_runs: list[Path], monkeypatch) -> None:
    greedy, sampled = Sampling(max_new_tokens=6), Sampling(max_new_tokens=6, temperature=0.8, top_p=0.9, seed=3)
    alone = {(run.name, s): tunesmith.generate(run, PROMPTS, s) for run in sft_runs for s in (greedy, sampled)}
    states = {run.name: _states(load_trained(run), PROMPTS[0]) for run in sft_runs}
    a, b = (run.name for run in sft_runs)
    assert not torch.allclose(states[a], states[b], atol=1e-4)  # the runs differ, so a missed switch shows

    loads = _count_base_loads(monkeypatch, "sft")
    loaded = load_adapters(sft_runs)
    for name in [b, a, b, a]:  # back and forth
        assert torch.allclose(_states(loaded.use(name), PROMPTS[0]), states[name], rtol=0, atol=1e-6)
        for s in (greedy, sampled):
            assert tunesmith.generate(loaded, PROMPTS, s, adapter=name) == alone[(name, s)]
    assert len(loads) == 1


def test_chat_switches_adapters_mid_conversation(lora_sft: list[Path], monkeypatch, capsys) -> None:
    a, b = lora_sft
    turns = ["colour of red 1?", f"/adapter {b.name}", "colour of blue 2?", f"/adapter {a.name}", "colour of gold 3?"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join([*turns, "/exit"]) + "\n"))
    code, out, err = run_cli(monkeypatch, capsys, "chat", a, "--run", b, "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0, out + err
    assert "/adapter NAME switches" in err
    replies = [part.split("\n", 1)[0] for part in out.split("model> ")[1:]]

    # Each reply is what that run alone answers to the conversation so far.
    history: list[dict[str, str]] = []
    expected = []
    for run, question in ((a, turns[0]), (b, turns[2]), (a, turns[4])):
        history.append({"role": "user", "content": question})
        answer = tunesmith.generate(run, [history], Sampling(max_new_tokens=5))[0]
        history.append({"role": "assistant", "content": answer})
        expected.append(answer.split("\n", 1)[0])
    assert replies == expected and expected[0] != expected[1]


def test_chat_lists_adapters_and_survives_an_unknown_name(lora_sft: list[Path], monkeypatch, capsys) -> None:
    a, b = lora_sft
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"/adapter nope\n/adapter {b.name}\n/adapters\n/exit\n"))
    code, out, err = run_cli(monkeypatch, capsys, "chat", f"first={a}", "--run", b)
    assert code == 0, out + err
    assert f"no run is named 'nope'; the runs loaded are first, {b.name}" in " ".join(err.split())
    listed = [line.split() for line in out.replace("you> ", "").splitlines() if line.strip()]
    assert listed == [["first", str(a), "(lora)"], ["*", b.name, str(b), "(lora)"]]  # * marks the one answering


def test_predict_through_the_cli(classifiers: dict[str, Path], monkeypatch, capsys) -> None:
    a, b = classifiers["lora"], classifiers["lora3"]
    alone = run_cli(monkeypatch, capsys, "predict", b, TEXTS[0])
    shared = run_cli(monkeypatch, capsys, "predict", a, "--run", f"three={b}", "--adapter", "three", TEXTS[0])
    assert alone.code == shared.code == 0, shared.text
    assert shared.out == alone.out and alone.out.strip()


def _edited_copy(run: Path, copy: Path, edit) -> Path:
    """A copy of a run whose config `edit` changed (what the refusals read before any model loads)."""
    shutil.copytree(run, copy)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    edit(config)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


def _refusal(monkeypatch, capsys, *args: object) -> str:
    """The one line `tunesmith predict ARGS TEXT` says as it refuses (exit 2)."""
    result = run_cli(monkeypatch, capsys, "predict", *args, TEXTS[0])
    assert result.code == 2, result.text
    assert len(result.err.strip().splitlines()) == 1 and result.err.startswith("error: "), result.err
    return result.text


def test_runs_that_cannot_share_a_base_are_refused_before_it_loads(
    classifiers: dict[str, Path], tmp_path: Path, monkeypatch, capsys
) -> None:
    a, b = classifiers["lora"], classifiers["lora3"]
    loads = _count_base_loads(monkeypatch, "classification")

    full = _edited_copy(a, tmp_path / "full", lambda c: c.update(method={"name": "full"}))
    text = _refusal(monkeypatch, capsys, a, "--run", full)
    assert f"{full}: method.name=full trains the model itself rather than adding a peft adapter beside it" in text
    assert "so the run cannot share a base model with others (runs of lora" in text and "load it alone" in text

    other = _edited_copy(a, tmp_path / "other", lambda c: c["model"].update(name="/elsewhere/bert"))
    text = _refusal(monkeypatch, capsys, a, "--run", other)
    assert f"{other}: model.name=/elsewhere/bert, but {a} has model.name=" in text
    assert "runs share a base model only when they start from the same one" in text

    sft = _edited_copy(a, tmp_path / "sft", lambda c: c.update(task="sft"))
    text = _refusal(monkeypatch, capsys, a, "--run", sft)
    assert f"{sft}: a sft run, and {a} a classification run; runs share a base model only within one task" in text

    text = _refusal(monkeypatch, capsys, a, "--run", b, "--adapter", "nope")
    assert f"no run is named 'nope'; the runs loaded are {a.name}, {b.name}" in text

    text = _refusal(monkeypatch, capsys, a, "--run", f"{a.name}={b}")
    assert f"two runs are named {a.name}: {a} and {b}" in text

    text = _refusal(monkeypatch, capsys, a, "--run", f"a b={b}")
    assert "'a b' cannot name a run (letters, digits, '.', '-' and '_' only)" in text
    assert loads == []  # every refusal came before the base model loaded


def test_adapters_of_different_kinds_are_refused(classifiers: dict[str, Path], monkeypatch, capsys) -> None:
    a, ia3 = classifiers["lora"], classifiers["ia3"]
    text = _refusal(monkeypatch, capsys, a, "--run", ia3)
    assert f"{ia3} (method.name=ia3) adds peft adapters of kind IA3, and {a} (method.name=lora) of kind LORA" in text
    assert "peft holds adapters of one kind on a model: load runs of one method together" in text


def test_one_run_loads_alone_as_before(classifiers: dict[str, Path]) -> None:
    a = classifiers["lora"]
    loaded = load_adapters(a)
    assert loaded.names == [a.name] and tunesmith.predict(loaded, TEXTS) == tunesmith.predict(a, TEXTS)
    assert tunesmith.predict(a, TEXTS, adapter=a.name) == tunesmith.predict(a, TEXTS)
    with pytest.raises(tunesmith.ConfigError, match="no run is named 'b'"):
        tunesmith.predict(a, TEXTS, adapter="b")
