"""The service's HTTP API in-process (no workers): files, jobs, requests, pages, errors, and that one
key never reaches another key's objects. The `openai` client talks to the app through FastAPI's
TestClient, so these tests read responses exactly as users' code does."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from tunesmith.service.app import create_app
from tunesmith.service.deps import Settings
from tunesmith.service.store import Checkpoint, Event, Job, Store, new_id, now

CHAT = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]} for w in "abcd"]


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture()
def service(tmp_path: Path) -> dict[str, Any]:
    store = Store.in_directory(tmp_path / "data")
    store.migrate()
    models = tmp_path / "models"
    (models / "tiny").mkdir(parents=True)
    app = create_app(Settings(store, tmp_path / "data", models, max_upload_mb=0.5))
    http = TestClient(app, raise_server_exceptions=False)
    keys = {name: store.create_key(name) for name in ("alice", "bob")}
    clients = {
        name: openai.OpenAI(base_url="http://testserver/v1", api_key=k, http_client=http, max_retries=0)
        for name, k in keys.items()
    }
    return {
        "store": store,
        "http": http,
        "keys": keys,
        "alice": clients["alice"],
        "bob": clients["bob"],
        "data": tmp_path / "data",
    }


def upload(client: openai.OpenAI, rows: list[Any] | bytes, name: str = "train.jsonl") -> Any:
    content = rows if isinstance(rows, bytes) else jsonl(rows)
    return client.files.create(file=(name, io.BytesIO(content)), purpose="fine-tune")


def test_no_key_no_access_except_health(service: dict[str, Any]) -> None:
    http = service["http"]
    assert http.get("/health").json() == {"status": "ok"}
    for path in ("/v1/files", "/v1/fine_tuning/jobs", "/v1/models"):
        reply = http.get(path)
        assert reply.status_code == 401
        assert reply.json()["error"]["code"] == "missing_api_key"
    wrong = http.get("/v1/files", headers={"Authorization": "Bearer ts-nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"


def test_uploads_are_checked_as_records_with_line_numbers(service: dict[str, Any]) -> None:
    alice = service["alice"]
    good = upload(alice, CHAT)
    assert (good.status, good.status_details, good.bytes) == ("processed", None, len(jsonl(CHAT)))
    broken = upload(alice, jsonl(CHAT[:2]) + b"{not json\n")
    assert broken.status == "error" and broken.status_details.startswith("line 3: not valid JSON")
    mixed = upload(alice, [*CHAT[:1], {"prompt": "p", "completion": "c"}])
    assert mixed.status_details == "line 2: a prompt_completion row in a file of chat rows"
    bad_role = upload(alice, [{"messages": [{"role": "robot", "content": "x"}]}])
    assert bad_role.status_details.startswith("line 1: messages[0].role: must be one of")
    assert alice.files.content(good.id).content == jsonl(CHAT)
    with pytest.raises(openai.APIStatusError) as too_big:
        upload(alice, b"x" * 600_000)
    assert too_big.value.status_code == 413


def test_file_pages_follow_the_cursor(service: dict[str, Any]) -> None:
    alice = service["alice"]
    made = [upload(alice, CHAT, f"f{i}.jsonl").id for i in range(5)]
    first = alice.files.list(limit=2, order="asc")
    assert [f.id for f in first.data] == made[:2] and first.has_more
    rest = alice.files.list(limit=10, order="asc", after=made[1])
    assert [f.id for f in rest.data] == made[2:] and not rest.has_more
    assert [f.id for f in alice.files.list()] == made[::-1]  # newest first; the client follows pages
    alice.files.delete(made[0])
    assert made[0] not in [f.id for f in alice.files.list()]
    assert not list((service["data"] / "files").glob(f"{made[0]}*"))


def test_job_creation_resolves_auto_and_records_it(service: dict[str, Any]) -> None:
    alice = service["alice"]
    file = upload(alice, CHAT * 50)  # 200 rows
    job = alice.fine_tuning.jobs.create(model="tiny", training_file=file.id, suffix="mine", metadata={"team": "a"})
    assert job.status == "queued" and job.user_provided_suffix == "mine"
    # n_epochs = clamp(ceil(3000 / 200), 1, 10) = 10; batch = 2**round(log2(200/100)) = 2 -> at least 4
    assert (job.hyperparameters.n_epochs, job.hyperparameters.batch_size) == (10, 4)
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    stored = service["store"].sessions().get(Job, job.id)
    assert stored.hyperparameters["auto"] == ["batch_size", "learning_rate_multiplier", "n_epochs"]
    events = [e.message for e in alice.fine_tuning.jobs.list_events(job.id)]
    assert events == ["Files validated, moving job to queued state", f"Validating training file: {file.id}"]
    dpo = alice.fine_tuning.jobs.create(
        model="tiny",
        training_file=upload(alice, [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3000).id,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "beta": "auto"}}},
    )
    assert dpo.hyperparameters.n_epochs == 2 and dpo.hyperparameters.batch_size == 32
    assert dpo.method.dpo.hyperparameters.beta == 0.1


@pytest.mark.parametrize(
    ("body", "status", "param", "words"),
    [
        ({"model": "gpt-4o"}, 400, "model", "not available on this server"),
        ({"training_file": "file-000000000000000000000000"}, 404, "file_id", "no file"),
        ({"method": {"type": "dpo"}}, 400, "training_file", "a dpo job reads preference rows"),
        ({"hyperparameters": {"n_epochs": 0}}, 400, "hyperparameters.n_epochs", "between 1 and 50"),
        ({"suffix": "a/b"}, 400, "suffix", "pattern"),
        ({"tunesmith": {"output": {"dir": "/tmp"}}}, 400, "tunesmith.output", "set by the service"),
        ({"tunesmith": {"data": {"replay": {"path": "/etc/passwd"}}}}, 400, "tunesmith.data.replay.path", "paths are"),
        ({"tunesmith": {"rl": {"reward": "os:system"}}}, 400, "tunesmith.rl.reward", "set by the service"),
        ({"method": {"type": "reinforcement"}}, 400, "method.reinforcement.grader", "needs"),
        ({"surprise": 1}, 400, "surprise", "Extra inputs"),
    ],
)
def test_bad_job_requests_get_openai_errors(service: dict[str, Any], body, status, param, words) -> None:
    http, key = service["http"], service["keys"]["alice"]
    file = upload(service["alice"], CHAT)
    request = {"model": "tiny", "training_file": file.id, **body}
    reply = http.post("/v1/fine_tuning/jobs", json=request, headers={"Authorization": f"Bearer {key}"})
    error = reply.json()["error"]
    assert reply.status_code == status, error
    assert error["param"] == param and words in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_a_broken_file_cannot_start_a_job(service: dict[str, Any]) -> None:
    alice = service["alice"]
    broken = upload(alice, b"[1]\n")
    with pytest.raises(openai.BadRequestError, match="line 1"):
        alice.fine_tuning.jobs.create(model="tiny", training_file=broken.id)


def test_extension_file_ids_become_stored_paths(service: dict[str, Any]) -> None:
    from tunesmith.service.jobs import check_extension

    alice = service["alice"]
    extra = upload(alice, CHAT)
    job = alice.fine_tuning.jobs.create(
        model="tiny",
        training_file=upload(alice, CHAT).id,
        extra_body={"tunesmith": {"data": {"replay": {"path": extra.id}}}},
    )
    assert job.status == "queued"
    assert check_extension({"data": {"replay": {"path": extra.id}}}, {extra.id: "files/x.jsonl"}) == {
        "data": {"replay": {"path": "files/x.jsonl"}}
    }


def test_cancel_pause_resume_follow_the_job_states(service: dict[str, Any]) -> None:
    alice, store = service["alice"], service["store"]
    job = alice.fine_tuning.jobs.create(model="tiny", training_file=upload(alice, CHAT).id)
    assert alice.fine_tuning.jobs.pause(job.id).status == "paused"
    with pytest.raises(openai.BadRequestError, match="only a queued or running job can pause"):
        alice.fine_tuning.jobs.pause(job.id)
    assert alice.fine_tuning.jobs.resume(job.id).status == "queued"
    claimed = store.claim("w", 60)
    assert claimed is not None and claimed.id == job.id
    running = alice.fine_tuning.jobs.cancel(job.id)  # a running job: a request its worker carries out
    assert running.status == "running"
    assert store.sessions().get(Job, job.id).requested == "cancel"
    other = alice.fine_tuning.jobs.create(model="tiny", training_file=upload(alice, CHAT).id)
    assert alice.fine_tuning.jobs.cancel(other.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        alice.fine_tuning.jobs.cancel(other.id)


def test_job_lists_filter_by_metadata_and_page(service: dict[str, Any]) -> None:
    alice = service["alice"]
    file = upload(alice, CHAT).id
    ids = [
        alice.fine_tuning.jobs.create(model="tiny", training_file=file, metadata={"n": str(i % 2)}).id for i in range(4)
    ]
    odd = alice.fine_tuning.jobs.list(metadata={"n": "1"})
    assert [j.id for j in odd.data] == [ids[3], ids[1]]
    page = alice.fine_tuning.jobs.list(limit=3)
    assert page.has_more and [j.id for j in page.data] == ids[::-1][:3]
    assert [j.id for j in alice.fine_tuning.jobs.list(limit=3, after=ids[1]).data] == [ids[0]]


def test_events_and_checkpoints_page_newest_first(service: dict[str, Any]) -> None:
    alice, store = service["alice"], service["store"]
    job = alice.fine_tuning.jobs.create(model="tiny", training_file=upload(alice, CHAT).id)
    with store.session() as s:
        for step in range(1, 6):
            s.add(
                Event(
                    id=new_id("ftevent"),
                    job_id=job.id,
                    created_at=now(),
                    level="info",
                    message=f"Step {step}",
                    type="metrics",
                    data={"step": step, "train_loss": 1.0 / step},
                )
            )
            s.add(
                Checkpoint(
                    id=new_id("ftckpt"),
                    job_id=job.id,
                    step=step,
                    created_at=now(),
                    metrics={"train_loss": 1.0 / step},
                    model_id=f"ft:tiny::x:ckpt-step-{step}",
                )
            )
    metrics = alice.fine_tuning.jobs.list_events(job.id, limit=2, extra_query={"type": "metrics"})
    assert [e.data["step"] for e in metrics.data] == [5, 4] and metrics.has_more
    after = alice.fine_tuning.jobs.list_events(job.id, limit=2, after=metrics.data[-1].id)
    assert [e.data["step"] for e in after.data] == [3, 2]
    checkpoints = alice.fine_tuning.jobs.checkpoints.list(job.id, limit=2)
    assert [c.step_number for c in checkpoints.data] == [5, 4]
    assert checkpoints.data[0].metrics.train_loss == pytest.approx(0.2)
    assert checkpoints.data[0].fine_tuned_model_checkpoint == "ft:tiny::x:ckpt-step-5"


def test_another_key_reaches_none_of_these_objects(service: dict[str, Any]) -> None:
    alice, http, bob_key = service["alice"], service["http"], service["keys"]["bob"]
    file = upload(alice, CHAT)
    job = alice.fine_tuning.jobs.create(model="tiny", training_file=file.id)
    with service["store"].session() as s:
        row = s.get(Job, job.id)
        row.status, row.fine_tuned_model, row.run_dir = "succeeded", "ft:tiny:x:1", "jobs/x/runs/run-1"
    headers = {"Authorization": f"Bearer {bob_key}"}
    calls = [
        ("GET", f"/v1/files/{file.id}", None),
        ("GET", f"/v1/files/{file.id}/content", None),
        ("DELETE", f"/v1/files/{file.id}", None),
        ("GET", f"/v1/fine_tuning/jobs/{job.id}", None),
        ("POST", f"/v1/fine_tuning/jobs/{job.id}/cancel", None),
        ("POST", f"/v1/fine_tuning/jobs/{job.id}/pause", None),
        ("POST", f"/v1/fine_tuning/jobs/{job.id}/resume", None),
        ("GET", f"/v1/fine_tuning/jobs/{job.id}/events", None),
        ("GET", f"/v1/fine_tuning/jobs/{job.id}/checkpoints", None),
        ("GET", f"/v1/fine_tuning/jobs/{job.id}/report", None),
        ("POST", f"/v1/fine_tuning/jobs/{job.id}/export", {"format": "hf"}),
        ("GET", "/v1/models/ft:tiny:x:1", None),
        ("POST", "/v1/chat/completions", {"model": "ft:tiny:x:1", "messages": [{"role": "user", "content": "hi"}]}),
        ("POST", "/v1/completions", {"model": "ft:tiny:x:1", "prompt": "hi"}),
        ("POST", "/v1/classifications", {"model": "ft:tiny:x:1", "input": "hi"}),
        ("POST", "/v1/fine_tuning/jobs", {"model": "tiny", "training_file": file.id}),
    ]
    for method, path, body in calls:
        reply = http.request(method, path, json=body, headers=headers)
        assert reply.status_code == 404, (method, path, reply.text)
    bob_lists = [http.get(p, headers=headers).json()["data"] for p in ("/v1/files", "/v1/fine_tuning/jobs")]
    assert bob_lists == [[], []]
    assert "ft:tiny:x:1" not in [m["id"] for m in http.get("/v1/models", headers=headers).json()["data"]]
    assert alice.files.retrieve(file.id).id == file.id  # untouched by all of the above
    assert alice.fine_tuning.jobs.retrieve(job.id).status == "succeeded"


def test_models_list_base_and_own_tuned_models(service: dict[str, Any]) -> None:
    ids = [m.id for m in service["alice"].models.list()]
    assert "tiny" in ids and "smollm2-135m" in ids
    with pytest.raises(openai.NotFoundError, match="base models are for fine-tuning"):
        service["alice"].chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])


def test_unknown_routes_and_bad_bodies_answer_in_openai_shape(service: dict[str, Any]) -> None:
    http, key = service["http"], service["keys"]["alice"]
    headers = {"Authorization": f"Bearer {key}"}
    missing = http.get("/v1/nothing", headers=headers)
    assert missing.status_code == 404 and "error" in missing.json()
    bad = http.post("/v1/fine_tuning/jobs", content=b"{", headers={**headers, "content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert http.get("/health").status_code == 200  # still up


def test_the_web_app_never_imports_torch() -> None:
    code = (
        "import sys; import tunesmith.service.app, tunesmith.service.serve, tunesmith.service.worker; "
        "print('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == (
        "False"
    )


def test_the_worker_writes_the_run_config_a_job_asks_for(service: dict[str, Any], tmp_path: Path) -> None:
    from tunesmith.service.worker import Worker

    alice, store, data = service["alice"], service["store"], service["data"]
    train, replay = upload(alice, CHAT), upload(alice, CHAT)
    job = alice.fine_tuning.jobs.create(
        model="tiny",
        training_file=train.id,
        seed=5,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 3}},
        },
        extra_body={
            "tunesmith": {"method": {"name": "full"}, "data": {"replay": {"path": replay.id, "fraction": 0.2}}}
        },
    )
    claimed = store.claim("w", 60)
    worker = Worker(store, data, tmp_path / "models")
    job_dir = data / "jobs" / job.id
    worker._prepare(claimed, job_dir)
    spec = json.loads((job_dir / "job.json").read_text())
    config = spec["config"]
    assert config["model"] == str((tmp_path / "models" / "tiny").resolve())
    assert (config["task"], config["method"], config["train"]) == (
        "sft",
        {"name": "full"},
        {"epochs": 2, "batch_size": 4, "seed": 5},
    )
    assert config["data"]["train"] == str(data.resolve() / "files" / f"{train.id}.jsonl")
    assert config["data"]["replay"] == {"path": str(data.resolve() / "files" / f"{replay.id}.jsonl"), "fraction": 0.2}
    assert config["output"] == {"dir": str(job_dir / "runs"), "name": "run"}
    assert spec["learning_rate_multiplier"] == 3
