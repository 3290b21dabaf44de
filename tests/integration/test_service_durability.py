"""Killing the service loses nothing: SIGKILL the whole server, or one worker, in the middle of a job;
after the restart (or the server starting another worker) the job continues from its last checkpoint
and ends with the same weights as a job that was never interrupted, and queued jobs still run."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from service_server import Server, chat_rows, start_server, wait_for, write_rows

pytestmark = pytest.mark.slow


def first_checkpoint(server: Server, job_id: str, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if list((server.data_dir / "jobs" / job_id).glob("runs/run-*/checkpoints/step-*/state.json")):
            return
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} wrote no checkpoint in {seconds} s")


def training_processes(job_id: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "tunesmith.service.runner" in cmdline and job_id in cmdline:
            found.append(p)
    return found


def workers_of(server: Server) -> list[psutil.Process]:
    assert server.process is not None
    children = psutil.Process(server.process.pid).children()
    return [c for c in children if "worker" in c.cmdline()]


def final_weights(server: Server, job_id: str) -> dict[str, torch.Tensor]:
    (run,) = (server.data_dir / "jobs" / job_id / "runs").glob("run-*")
    return load_file(str(run / "final" / "trainable.safetensors"))


def test_sigkill_of_server_and_worker_mid_job_loses_nothing(tmp_path: Path, tiny_llama: Path) -> None:
    server, key = start_server(tmp_path, tiny_llama)
    try:
        client = server.client(key)
        with write_rows(tmp_path / "train.jsonl", chat_rows(160)).open("rb") as fh:
            train = client.files.create(file=fh, purpose="fine-tune")
        body = {
            "model": "tiny-llama",
            "training_file": train.id,
            "seed": 3,
            "hyperparameters": {"n_epochs": 1, "batch_size": 4},
            "extra_body": {"tunesmith": {"train": {"save_every": 5}, "method": {"name": "full"}}},
        }
        a, b, reference = (client.fine_tuning.jobs.create(**body) for _ in range(3))

        first_checkpoint(server, a.id)
        server.kill()  # the web process; its model host, worker and training process die with it
        deadline = time.time() + 10
        while training_processes(a.id) and time.time() < deadline:
            time.sleep(0.1)
        assert not training_processes(a.id), "the training process outlived its server"
        server = Server(server.data_dir, server.models, server.port).start()
        client = server.client(key)
        assert client.fine_tuning.jobs.retrieve(reference.id).status == "queued"  # still waiting its turn

        first_checkpoint(server, b.id, seconds=240)  # a resumes first (once its lease runs out), then b
        (worker,) = workers_of(server)
        worker.send_signal(signal.SIGKILL)  # one worker alone; the server starts another

        for job in (a, b, reference):
            done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"), seconds=300)
            assert done.status == "succeeded", done.error
        for interrupted in (a, b):
            events = [e.message for e in client.fine_tuning.jobs.list_events(interrupted.id, limit=200)]
            assert "Resuming the job from its last checkpoint" in events
        expected = final_weights(server, reference.id)
        for interrupted in (a, b):
            got = final_weights(server, interrupted.id)
            assert got.keys() == expected.keys()
            for name, tensor in expected.items():
                torch.testing.assert_close(got[name], tensor, rtol=0, atol=1e-6, msg=name)
    finally:
        server.stop()
