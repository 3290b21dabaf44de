"""The service end to end: a real `tunesmith serve` (web app, model host, worker processes) and the
official `openai` client, unchanged, pointed at it. Jobs train the tiny in-process models."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service_server import chat_rows, start_server, wait_for, write_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, tiny_bert: Path) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("service")
    (tmp / "models").mkdir()
    (tmp / "models" / "tiny-bert").symlink_to(tiny_bert)
    server, key = start_server(tmp, tiny_llama)
    try:
        yield {"server": server, "client": server.client(key), "tmp": tmp}
    finally:
        server.stop()


def upload(client: Any, path: Path) -> Any:
    with path.open("rb") as fh:
        return client.files.create(file=fh, purpose="fine-tune")


def test_supervised_job_with_the_openai_client(served: dict[str, Any]) -> None:
    client, tmp = served["client"], served["tmp"]
    train = upload(client, write_rows(tmp / "train.jsonl", chat_rows(40)))
    valid = upload(client, write_rows(tmp / "valid.jsonl", chat_rows(10)))
    assert train.status == "processed"
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=train.id,
        validation_file=valid.id,
        suffix="words",
        seed=7,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 20}},
        },
    )
    job = wait_for(client, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny-llama:words:{job.id.split('-')[1][:8]}"
    assert job.trained_tokens and job.trained_tokens > 0

    events = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
    messages = [e.message for e in events if e.type == "message"]
    assert messages[0] == "The job has successfully completed" and "Fine-tuning job started" in messages
    train_losses = [e.data["train_loss"] for e in reversed(events) if e.type == "metrics" and "train_loss" in e.data]
    valid_losses = [e.data["valid_loss"] for e in events if e.type == "metrics" and "valid_loss" in e.data]
    assert len(train_losses) >= 2 and train_losses[-1] < train_losses[0]
    assert len(valid_losses) == 3  # one evaluation per epoch

    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and all(c.fine_tuned_model_checkpoint.startswith(job.fine_tuned_model) for c in checkpoints)
    assert checkpoints[0].metrics.valid_loss is not None and checkpoints[0].step_number > 0

    run = next((served["server"].data_dir / "jobs" / job.id / "runs").glob("run-*"))
    plan = json.loads((run / "plan.json").read_text())
    assert plan["service"]["hyperparameters"]["batch_size"] == job.hyperparameters.batch_size == 4  # "auto"
    from tunesmith.methods.lora import LoraMethod

    assert plan["lr"] == pytest.approx(20 * LoraMethod.default_lr)  # the multiplier times the method's default

    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    question = [{"role": "user", "content": "say cat"}]
    whole = client.chat.completions.create(model=job.fine_tuned_model, messages=question, max_tokens=6)
    assert whole.choices[0].message.role == "assistant" and whole.usage.completion_tokens > 0
    pieces = client.chat.completions.create(model=job.fine_tuned_model, messages=question, max_tokens=6, stream=True)
    chunks = list(pieces)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content  # greedy: the same answer, sent in pieces
    assert len(chunks) >= 3 and chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = client.completions.create(model=job.fine_tuned_model, prompt="say", max_tokens=4)
    assert text.choices[0].finish_reason in ("stop", "length") and text.usage.prompt_tokens > 0

    report = client.get(f"/fine_tuning/jobs/{job.id}/report", cast_to=str)
    assert "<html" in report.lower()
    exported = client.post(f"/fine_tuning/jobs/{job.id}/export", body={"format": "peft"}, cast_to=object)
    parity = exported["parity"]
    assert exported["format"] == "peft" and parity["max_abs_logit_diff"] <= parity["tolerance"]
    assert parity["greedy_generations_identical"]


def test_reinforcement_job_with_a_grader(served: dict[str, Any]) -> None:
    client, tmp = served["client"], served["tmp"]
    words = ["red", "blue", "green", "cat", "dog", "sun", "sea", "sky"]
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}], "answer": w} for w in words]
    train = upload(client, write_rows(tmp / "rft.jsonl", rows))
    grader = {
        "type": "string_check",
        "name": "says it",
        "input": "{{sample.output_text}}",
        "reference": "{{item.answer}}",
        "operation": "like",
    }
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=train.id,
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": {"n_epochs": 2}}},
        extra_body={"tunesmith": {"rl": {"group_size": 4, "max_new_tokens": 4}, "method": {"name": "full"}}},
    )
    job = wait_for(client, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    rewards = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert any("reward" in d for d in rewards)
    with pytest.raises(Exception, match="grader.source"):
        client.fine_tuning.jobs.create(
            model="tiny-llama",
            training_file=train.id,
            method={"type": "reinforcement", "reinforcement": {"grader": {**grader, "source": "def grade(:"}}},
        )


def test_classifier_job_through_the_extension(served: dict[str, Any]) -> None:
    from conftest import sentiment_rows

    client, tmp = served["client"], served["tmp"]
    train = upload(client, write_rows(tmp / "reviews.jsonl", sentiment_rows(64)))
    job = client.fine_tuning.jobs.create(
        model="tiny-bert",
        training_file=train.id,
        hyperparameters={"n_epochs": 2},
        extra_body={
            "tunesmith": {
                "task": "classification",
                "method": {"name": "full"},
                "train": {"lr": 1e-3},
                "data": {"max_length": 32},
            }
        },
    )
    job = wait_for(client, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    answer = client.post(
        "/classifications", body={"model": job.fine_tuned_model, "input": ["great", "awful"]}, cast_to=object
    )
    assert [d["index"] for d in answer["data"]] == [0, 1]
    assert all(abs(sum(d["scores"].values()) - 1) < 1e-4 and d["label"] in d["scores"] for d in answer["data"])
    with pytest.raises(Exception, match="use /v1/classifications"):
        client.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])


def test_a_failing_job_says_why_and_the_server_stays_up(served: dict[str, Any]) -> None:
    client, tmp = served["client"], served["tmp"]
    train = upload(client, write_rows(tmp / "few.jsonl", chat_rows(5)))
    job = client.fine_tuning.jobs.create(
        model="tiny-llama", training_file=train.id, extra_body={"tunesmith": {"train": {"no_such_setting": 1}}}
    )
    job = wait_for(client, job.id, ("succeeded", "failed"))
    assert job.status == "failed" and "no_such_setting" in job.error.message
    assert client.models.list().data  # still serving


def test_dpo_job_on_openai_preference_rows(served: dict[str, Any]) -> None:
    client, tmp = served["client"], served["tmp"]
    words = ["red", "blue", "green", "cat", "dog", "sun", "sea", "sky"]
    rows = [
        {
            "input": {"messages": [{"role": "user", "content": f"say {w}"}]},
            "preferred_output": [{"role": "assistant", "content": w}],
            "non_preferred_output": [{"role": "assistant", "content": "no"}],
        }
        for w in words * 2
    ]
    train = upload(client, write_rows(tmp / "pairs.jsonl", rows))
    job = client.fine_tuning.jobs.create(
        model="tiny-llama",
        training_file=train.id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "beta": 0.2}}},
    )
    assert job.method.dpo.hyperparameters.beta == 0.2
    job = wait_for(client, job.id, ("succeeded", "failed"))
    assert job.status == "succeeded", job.error
    run = next((served["server"].data_dir / "jobs" / job.id / "runs").glob("run-*"))
    assert "beta: 0.2" in (run / "config.yaml").read_text()
    metrics = [e.data for e in client.fine_tuning.jobs.list_events(job.id, limit=100) if e.type == "metrics"]
    assert any("train_loss" in d for d in metrics)
