"""The service under load, on loopback: 200 concurrent clients poll job status and events (each one
a status and an events request, then a 1 s pause, as a dashboard does) while 2 workers train 2 jobs
and 20 more wait in the queue. Reports p50/p99 latency, the request rate and the errors.

The jobs are LoRA SFT of the packaged SmolLM2-135M on rotten-tomatoes-sft rows (long enough to keep
both workers busy throughout). Everything runs on this machine: the web process, the model host,
the 2 workers and the clients share its cores, which is the point of the measurement.

Run: `python bench/service_load.py [--clients 200] [--seconds 60]`; the result goes to
bench/results/service-load-<timestamp>.md (and .json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tunesmith.machine import cpu_name
from tunesmith.zoo import packaged_data_rows

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def start(data: Path, port: int, workers: int) -> tuple[subprocess.Popen, str]:
    cli = [sys.executable, "-m", "tunesmith.cli"]
    key = subprocess.run(
        [*cli, "keys", "create", "load", "--data-dir", str(data)], capture_output=True, text=True, check=True
    ).stdout.strip()
    log = (data.parent / "serve.log").open("w")
    server = subprocess.Popen(
        [*cli, "serve", "--workers", str(workers), "--port", str(port), "--data-dir", str(data)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return server, key
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start")


def submit(base: str, key: str, rows: Path, jobs: int) -> list[str]:
    headers = {"Authorization": f"Bearer {key}"}
    with rows.open("rb") as fh:
        file = httpx.post(
            f"{base}/v1/files", headers=headers, files={"file": fh}, data={"purpose": "fine-tune"}, timeout=60
        ).json()
    body = {
        "model": "smollm2-135m",
        "training_file": file["id"],
        "hyperparameters": {"n_epochs": 1, "batch_size": 8},
        "tunesmith": {"train": {"max_steps": 400}, "data": {"max_length": 128}},
    }
    return [
        httpx.post(f"{base}/v1/fine_tuning/jobs", headers=headers, json=body, timeout=60).json()["id"]
        for _ in range(jobs)
    ]


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One GET on a kept-alive connection; returns the status."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return status


async def client(
    port: int, key: str, jobs: list[str], until: float, latencies: list[float], errors: list[str], seed: int
) -> None:
    """A client that polls: a job's status, then its events, then a 1 s pause. It speaks HTTP/1.1 over
    one kept-alive connection by hand: httpx's async client spent more CPU than the server it measured
    (200 of them saturated a core on their own), which would have measured the client."""
    rng = random.Random(seed)
    await asyncio.sleep(rng.random())  # spread the clients over the first second
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            job = rng.choice(jobs)
            for path in (f"/v1/fine_tuning/jobs/{job}", f"/v1/fine_tuning/jobs/{job}/events?limit=20"):
                request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n\r\n"
                t0 = time.perf_counter()
                try:
                    status = await get(reader, writer, request.encode())
                    if status != 200:
                        errors.append(f"{status} {path}")
                except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                    errors.append(f"{type(exc).__name__} {path}")
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                latencies.append(time.perf_counter() - t0)
            await asyncio.sleep(1.0)
    finally:
        writer.close()


async def load(port: int, key: str, jobs: list[str], clients: int, seconds: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    until = time.perf_counter() + seconds
    await asyncio.gather(*(client(port, key, jobs, until, latencies, errors, i) for i in range(clients)))
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "requests_per_second": len(latencies) / seconds,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[int(0.99 * (len(ordered) - 1))],
        "max_ms": 1000 * ordered[-1],
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--jobs", type=int, default=22)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--workers", type=int, default=2, help="0 measures the web process alone")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tunesmith-load-"))
    rows = tmp / "train.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r, _ in packaged_data_rows("rotten-tomatoes-sft")[:2000]))
    server, key = start(tmp / "data", args.port, args.workers)
    base = f"http://127.0.0.1:{args.port}"
    try:
        jobs = submit(base, key, rows, args.jobs)
        headers = {"Authorization": f"Bearer {key}"}
        while True:  # measure once both workers are training
            states = [httpx.get(f"{base}/v1/fine_tuning/jobs/{j}", headers=headers).json() for j in jobs]
            running = [s for s in states if s["status"] == "running" and (s["tunesmith"]["progress"] or {}).get("step")]
            if len(running) >= min(2, args.workers):
                break
            time.sleep(1)
        result = asyncio.run(load(args.port, key, jobs, args.clients, args.seconds))
        states = [httpx.get(f"{base}/v1/fine_tuning/jobs/{j}", headers=headers).json()["status"] for j in jobs]
        result["jobs_during"] = {s: states.count(s) for s in sorted(set(states))}
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    record = {
        "cpu": cpu_name(),
        "cpu_bf16": "avx512_bf16" in flags,
        "cores": os.cpu_count(),
        "clients": args.clients,
        "seconds": args.seconds,
        **result,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"service-load-{stamp}.json").write_text(json.dumps(record, indent=1))
    table = (
        f"Machine: {record['cpu']} ({record['cores']} cores, avx512_bf16 {'yes' if record['cpu_bf16'] else 'no'})\n\n"
        "| clients | requests | req/s | p50 | p99 | max | errors | jobs at the end |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---|\n"
        f"| {args.clients} | {result['requests']} | {result['requests_per_second']:.0f} | {result['p50_ms']:.1f} ms | "
        f"{result['p99_ms']:.1f} ms | {result['max_ms']:.0f} ms | {result['errors']} | {result['jobs_during']} |\n"
    )
    (RESULTS / f"service-load-{stamp}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
